"""msModelSlim W4A16 (per-group int4 weights on every linear, activations unquantized) on vLLM's CPU
backend.

Fixture ``ernie-tiny-w4a16-msmodelslim``: what msModelSlim 26.1.0's v0 ``llm_ptq`` API wrote for
``ernie-tiny-bf16-wide`` with groups of 32 inputs
(``MODE=w4a16 tests/fixtures/msmodelslim/recipe.sh``).
Reference: transformers in fp32 on the checkpoint with the int4 values read nibble by nibble and
multiplied by their group's scale.
"""

import json
from pathlib import Path

import pytest
import torch
from reference import (
    assert_bf16_drift,
    check_logprobs_close,
    dequantized_checkpoint,
    description_of,
    load_tensors,
    logprob_drift,
    transformers_greedy,
    vllm_greedy,
)

from vllm_ernie_moe.quant.linear import ErnieW4A16LinearMethod
from vllm_ernie_moe.quant.msmodelslim import QuantizationFormatError, load_description
from vllm_ernie_moe.tools import quantize

FIXTURES = Path(__file__).parent / "fixtures"
W4A16 = FIXTURES / "ernie-tiny-w4a16-msmodelslim"
SOURCE = FIXTURES / "ernie-tiny-bf16-wide"
MAX_TOKENS, TOP_K = 32, 5
_results: dict[int, list] = {}


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def engine(request):
    tp = request.param
    _results[tp] = vllm_greedy(W4A16, "bfloat16", tp, MAX_TOKENS, TOP_K)
    return tp, _results[tp]


def test_matches_fake_quant_reference(engine, tmp_path):
    tp, outputs = engine
    if tp != 1:
        pytest.skip("compared once, at TP=1")
    reference = transformers_greedy(
        dequantized_checkpoint(W4A16, tmp_path / "dequantized"), "float32", MAX_TOKENS, TOP_K
    )
    check_logprobs_close(reference, outputs)
    assert_bf16_drift(reference, outputs)
    # int4 moves the logits: the bf16 source's own output is not this reference.
    source = transformers_greedy(SOURCE, "float32", MAX_TOKENS, TOP_K)
    assert logprob_drift(source, reference).max() > 0.05


def test_tensor_parallel_matches_tp1(engine):
    tp, outputs = engine
    if tp == 1:
        pytest.skip("TP=1 is the baseline")
    check_logprobs_close(_results[1], outputs)
    assert_bf16_drift(_results[1], outputs)


def test_offline_tool_reproduces_msmodelslim_bit_for_bit(tmp_path):
    out = tmp_path / "out"
    quantize.main(
        ["--model", str(SOURCE), "--output", str(out), "--format", "w4a16", "--group-size", "32"]
    )
    ours, theirs = load_tensors(out), load_tensors(W4A16)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    # msModelSlim v0 writes no "metadata" / "optional" keys; every label and setting is equal.
    mine = {k: v for k, v in description_of(out).items() if k not in ("metadata", "optional")}
    assert mine == description_of(W4A16)


def test_fixture_is_per_group_int4():
    """What the loader relies on: labels W4A16, group 32, packed rows, zero offsets."""
    description = description_of(W4A16)
    assert description["model_quant_type"] == "W4A16" and description["group_size"] == 32
    tensors = load_tensors(W4A16)
    weight = tensors["model.layers.1.mlp.experts.0.down_proj.weight"]
    assert weight.dtype == torch.int8 and list(weight.shape) == [32, 64]  # [out / 2, in]
    assert list(tensors["model.layers.1.mlp.experts.0.down_proj.weight_scale"].shape) == [64, 2]
    assert not any(t.count_nonzero() for n, t in tensors.items() if n.endswith("weight_offset"))


def _with(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "quant_model_description.json"
    path.write_text(json.dumps(dict(description_of(W4A16), **changes)))
    return path


@pytest.mark.parametrize("group_size", [0, 48, 256])
def test_group_sizes_the_kernels_lack_are_refused(tmp_path, group_size):
    """Per-channel W4A16 (group 0) and groups the int4 CPU kernels do not take: named, with the
    fix, at load (not a wrong answer later)."""
    with pytest.raises(QuantizationFormatError, match=rf"W4A16 with group_size={group_size}"):
        load_description(_with(tmp_path, group_size=group_size))


@pytest.mark.parametrize("group_size", ["128g", 32.5])
def test_a_group_size_that_is_no_whole_number_is_named(tmp_path, group_size):
    with pytest.raises(QuantizationFormatError, match="is not a whole number of inputs"):
        load_description(_with(tmp_path, group_size=group_size))


def test_group_size_on_per_channel_formats_is_refused(tmp_path):
    labels = {k: "W8A8_DYNAMIC" for k, v in description_of(W4A16).items() if v == "W4A16"}
    with pytest.raises(QuantizationFormatError, match="only served for W4A16"):
        load_description(_with(tmp_path, **labels))


def test_experts_that_split_a_group_are_refused():
    """Experts whose per-rank intermediate size (48) is no multiple of the group (32): named."""
    from types import SimpleNamespace

    from vllm_ernie_moe.quant.moe import ErnieW4A16MoEMethod

    moe = SimpleNamespace(hidden_dim=64, intermediate_size_per_partition=48)
    with pytest.raises(QuantizationFormatError, match="model.layers.1.mlp.experts"):
        ErnieW4A16MoEMethod(moe, 32, "model.layers.1.mlp.experts")


def test_offline_tool_refuses_a_group_size_the_server_would_refuse(tmp_path):
    with pytest.raises(quantize.QuantizeError, match="group size 48"):
        quantize.quantize_checkpoint(SOURCE, tmp_path / "out", label="W4A16", group_size=48)


def test_tensor_parallel_split_inside_a_group_is_refused():
    """A row-parallel shard of 48 inputs cannot hold whole groups of 32: refused with the layer."""
    from torch.nn import Module

    method = ErnieW4A16LinearMethod(32, "model.layers.0.mlp.down_proj")
    with pytest.raises(QuantizationFormatError, match="model.layers.0.mlp.down_proj"):
        method.create_weights(Module(), 48, [64], 96, 64, torch.bfloat16, weight_loader=None)
