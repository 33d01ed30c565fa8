"""msModelSlim W4A16 (per-group int4 weights on every linear, activations unquantized) on vLLM's CPU
backend.

Fixture ``ernie-tiny-w4a16-msmodelslim``: what msModelSlim 26.1.0's v0 ``llm_ptq`` API wrote for
``ernie-tiny-bf16-wide`` with groups of 32 inputs
(``MODE=w4a16 tests/fixtures/msmodelslim/recipe.sh``).
Reference: transformers in fp32 on the checkpoint with the int4 values read nibble by nibble and
multiplied by their group's scale; where vLLM's int4 kernels serve W4A16 (VNNI), with the input of
every int4 linear and expert (not the router's, not the lm_head's) quantized to int8 per token, and
the linears' prompt pass on their int8 copy (``VLLM_ERNIE_MOE_W4A16_INT8_PREFILL``).
"""

import json
from pathlib import Path

import pytest
import torch
from reference import (
    PROMPTS,
    assert_bf16_drift,
    check_logprobs_close,
    dequantized_checkpoint,
    description_of,
    fake_quantize_activations,
    group_quantizer,
    load_tensors,
    logprob_drift,
    prompt_token_ids,
    quantize_activations,
    transformers_greedy,
    unpacked_int4,
    vllm_greedy,
)

from vllm_ernie_moe import native_int4
from vllm_ernie_moe.quant.cpu_experts import vllm_kernel_serves
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


def int8_copy_weights(quantized_dir: Path) -> dict[str, torch.Tensor]:
    """Each W4A16 linear's int8 copy as fp32, from the checkpoint (module name -> weight): per
    row, the int4 values times their group's scale (rounded to bf16, as the kernels hold it) in
    steps of a 16th of the row's largest group scale, rounded to whole steps."""
    description, tensors = description_of(quantized_dir), load_tensors(quantized_dir)
    copies = {}
    for name, label in description.items():
        if label != "W4A16" or ".experts." in name or not name.endswith(".weight"):
            continue  # routed experts run on their own kernel at every size
        scale = tensors[f"{name}_scale"].bfloat16().double()
        values = unpacked_int4(tensors[name]).double()
        step = scale.amax(dim=1, keepdim=True) / 16
        weight = values * scale.repeat_interleave(values.shape[1] // scale.shape[1], dim=1)
        copies[name.removesuffix(".weight")] = (torch.round(weight / step) * step).float()
    return copies


def prompt_pass_on_int8_copy(copies: dict[str, torch.Tensor]):
    """A ``prepare`` for :func:`transformers_greedy`: activations int8 per token, and the linears'
    prompt pass on their int8 copy. vLLM takes the copy from 32 rows per call on: its first step
    holds all the prompts (checked below), each later step one row per prompt."""
    import types

    import torch.nn.functional as F

    def forward(self, x):
        weight = self.int8_copy if x.shape[-2] > 1 else self.weight
        return F.linear(quantize_activations(x), weight, self.bias)

    def prepare(model) -> None:
        fake_quantize_activations(model)
        for name, module in model.named_modules():
            if name in copies:
                module.int8_copy = copies[name]
                module.forward = types.MethodType(forward, module)

    return prepare


def engine_kernels() -> str:
    """Which kernels this host's default engine runs the fixture's W4A16 layers on."""
    if vllm_kernel_serves("w4a16"):
        return "vllm-int4"
    return "avx2" if native_int4.serves(64, 32) else "portable"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, list]:
    """transformers in fp32 on the dequantized fixture, by what its activations go through:
    int8 per token with the linears' prompt pass on their int8 copy (vLLM's int4 kernels), int8
    per group of 32 (the AVX2 kernel), the model dtype (the portable kernels); and int8 per token
    alone, for the int8 copy's drift."""
    plain = dequantized_checkpoint(W4A16, tmp_path_factory.mktemp("w4a16") / "dequantized")
    copies, dequantized = int8_copy_weights(W4A16), load_tensors(plain)
    assert any(not torch.equal(w, dequantized[f"{name}.weight"]) for name, w in copies.items())

    def greedy(prepare=None) -> list:
        return transformers_greedy(plain, "float32", MAX_TOKENS, TOP_K, prepare=prepare)

    def per_group(model) -> None:
        fake_quantize_activations(model, quantize=group_quantizer(32))

    return {
        "vllm-int4": greedy(prompt_pass_on_int8_copy(copies)),
        "avx2": greedy(per_group),
        "portable": greedy(),
        "int8-per-token": greedy(fake_quantize_activations),
    }


def test_matches_fake_quant_reference(engine, references):
    """Where vLLM's int4 kernels serve W4A16 (VNNI), every int4 linear and expert quantizes its
    input to int8 per token inside, and the linears run the prompts' step on their int8 copy; on
    the AVX2 kernel (x86 without VNNI) they quantize it per group of 32 (the fixture's group), the
    prompts' step too, as it holds fewer than 128 rows; elsewhere activations stay in the model
    dtype. The reference does the same. The references are close on this fixture (the drifts
    printed): the kernels' math itself is pinned by
    test_linear_on_vllm_int4_kernel_computes_int8_activation_math,
    test_int8_copy_serves_calls_of_32_rows_or_more and tests/test_native_int4.py."""
    tp, outputs = engine
    if tp != 1:
        pytest.skip("compared once, at TP=1")
    prompt_rows = sum(map(len, prompt_token_ids(W4A16)))
    assert 32 <= prompt_rows < native_int4.DEQUANTIZE_FROM_ROWS and len(PROMPTS) < 32
    kernels = engine_kernels()
    reference = references[kernels]
    check_logprobs_close(reference, outputs)
    assert_bf16_drift(reference, outputs)
    for other, generations in references.items():
        print(f"drift from {other}: max {logprob_drift(generations, reference).max():.3f}")
    # int4 moves the logits: the bf16 source's own output is not this reference.
    source = transformers_greedy(SOURCE, "float32", MAX_TOKENS, TOP_K)
    assert logprob_drift(source, reference).max() > 0.05


@pytest.fixture(scope="module")
def portable_outputs():
    """Greedy outputs with ``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=0`` where the AVX2 kernel serves by
    default (x86 without VNNI, or the AVX2 tier forced)."""
    if engine_kernels() != "avx2":
        pytest.skip("the default engine does not run the AVX2 kernel here")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL", "0")
        return vllm_greedy(W4A16, "bfloat16", 1, MAX_TOKENS, TOP_K)


def test_avx2_kernel_switched_off_keeps_model_dtype_activations(
    engine, portable_outputs, references
):
    """``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=0``: the portable kernels, W4A16's math with the
    activations in the model dtype, as the reference; the outputs move from the default's."""
    tp, default_outputs = engine
    if tp != 1:
        pytest.skip("compared once, at TP=1")
    check_logprobs_close(references["portable"], portable_outputs)
    assert_bf16_drift(references["portable"], portable_outputs)
    assert logprob_drift(default_outputs, portable_outputs).max() > 0


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


def skip_without_vllm_int4_linear() -> None:
    if not (vllm_kernel_serves("w4a16") and hasattr(torch.ops._C, "int4_scaled_mm_cpu")):
        pytest.skip("vLLM's int4 linear does not serve W4A16 here (no VNNI, or switched off)")


def _w4a16_layer(monkeypatch, scale: torch.Tensor, int8_copy: bool):
    """An o_proj-shaped W4A16 linear (96 x 256, groups of 32) on vLLM's int4 kernel, its int4
    values random, after the method's load-time processing; returns (method, layer, values)."""
    from torch.nn import Module
    from vllm.model_executor import parameter

    from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

    skip_without_vllm_int4_linear()
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_INT8_PREFILL", "1" if int8_copy else "0")
    method = ErnieW4A16LinearMethod(32, "model.layers.0.self_attn.o_proj")
    layer = Module()
    method.create_weights(layer, 256, [96], 256, 96, torch.bfloat16, weight_loader=lambda *a: 0)
    assert method.on_vllm_kernel
    values = torch.randint(-8, 8, (96, 256), generator=torch.Generator().manual_seed(3))
    layer.weight.data.copy_(pack_int4_rows(values.to(torch.int8)))
    layer.weight_scale.data.copy_(scale)
    method.process_weights_after_loading(layer)
    return method, layer, values


def _tokens(tokens: int) -> torch.Tensor:
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(4))
    x[:, 0] = 20  # an outlier sets each token's int8 step: coarse for the other inputs
    return x.bfloat16()


def _group_scaled(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W4A16's weight in float64: int4 values times their group's scale as the kernels hold it."""
    return values.double() * scale.bfloat16().double().repeat_interleave(32, dim=1)


@pytest.mark.parametrize("tokens", [1, 8, 200])
def test_linear_on_vllm_int4_kernel_computes_int8_activation_math(tokens, monkeypatch):
    """Where vLLM's int4 linear serves W4A16, the method's repack feeds it msModelSlim's rows and
    group scales: its output is int4 x group scale times the input quantized to int8 per token
    (float64), measurably closer to that than to W4A16's unquantized-input math. 8 tokens run as
    calls of 4 rows (``quant.int4.int4_linear``); without the int8 copy, 200 run on int4 too."""
    from reference import quantize_activations

    scale = torch.rand(96, 8, generator=torch.Generator().manual_seed(2)) * 0.01 + 1e-3
    method, layer, values = _w4a16_layer(monkeypatch, scale, int8_copy=False)
    assert not method.keeps_int8_copy
    x = _tokens(tokens)
    got = method.apply(layer, x).double()
    weight = _group_scaled(values, scale)
    int8_math = quantize_activations(x.double()) @ weight.T
    error = (got - int8_math).abs().max()
    assert error <= int8_math.abs().max() * 2**-8
    assert (got - x.double() @ weight.T).abs().max() > 3 * error


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_no_int8_copy_under_vllm_batch_invariance(monkeypatch, batch_invariant):
    """With the copy, a request's numbers depend on its step's rows; vLLM's batch-invariant mode
    (``VLLM_BATCH_INVARIANT=1``, as vLLM read it) turns it off."""
    from vllm import envs as vllm_envs

    # vLLM caches its settings once an engine ran in this process: set the value it reads.
    monkeypatch.setattr(vllm_envs, "VLLM_BATCH_INVARIANT", batch_invariant, raising=False)
    method, _, _ = _w4a16_layer(monkeypatch, torch.full((96, 8), 5e-3), int8_copy=True)
    assert method.keeps_int8_copy is not batch_invariant


@pytest.mark.parametrize("tokens", [32, 200])
def test_int8_copy_serves_calls_of_32_rows_or_more(tokens, monkeypatch):
    """With the int8 copy (``VLLM_ERNIE_MOE_W4A16_INT8_PREFILL``), calls of 32 rows or more run
    vLLM's int8 GEMM on the weight re-quantized per row: hand-computed, each row's group-scaled
    int4 weight in steps of a 16th of its largest group scale, rounded, times the input quantized
    to int8 per token. Each row's last group has 10x the others' scale, so that the row's one step
    is coarse for the rest: measurably farther from the int4 math than from that (the output's
    bf16 rounding is the error left). 31 rows stay on the int4 kernel, bit for bit."""
    from reference import quantize_activations

    scale = torch.full((96, 8), 5e-3)
    scale[:, 7] = 5e-2
    method, layer, values = _w4a16_layer(monkeypatch, scale, int8_copy=True)
    assert method.keeps_int8_copy
    x, inputs = _tokens(tokens), quantize_activations(_tokens(tokens).double())
    got = method.apply(layer, x).double()
    weight = _group_scaled(values, scale)
    row_step = scale.bfloat16().double().amax(dim=1, keepdim=True) / 16
    requantized_math = inputs @ (torch.round(weight / row_step) * row_step).T
    error = (got - requantized_math).abs().max()
    assert error <= requantized_math.abs().max() * 2**-8
    assert (got - inputs @ weight.T).abs().max() > 3 * error
    int4_only, int4_layer, _ = _w4a16_layer(monkeypatch, scale, int8_copy=False)
    below = _tokens(31)
    assert torch.equal(method.apply(layer, below), int4_only.apply(int4_layer, below))


def test_switch_keeps_w4a16_activations_in_the_model_dtype(monkeypatch):
    """``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS=0``: neither the linears nor the experts go to
    vLLM's int4 kernels (which quantize activations), on any host. An fp32 model keeps its
    linears off vLLM's int4 linear, which refuses fp32 activations."""
    from torch.nn import Module
    from vllm.model_executor import parameter

    from vllm_ernie_moe.quant.cpu_experts import PortableCPUExpertsW4A16, cpu_experts_class

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS", "0")
    method = ErnieW4A16LinearMethod(32, "model.layers.0.self_attn.o_proj")
    method.create_weights(Module(), 256, [96], 256, 96, torch.bfloat16, weight_loader=lambda *a: 0)
    assert not method.on_vllm_kernel
    assert issubclass(cpu_experts_class("w4a16"), PortableCPUExpertsW4A16)
    monkeypatch.delenv("VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS")
    method.create_weights(Module(), 256, [96], 256, 96, torch.float32, weight_loader=lambda *a: 0)
    assert not method.on_vllm_kernel  # vLLM's int4 linear takes bf16 / fp16 activations only


@pytest.mark.parametrize("shape", [(5, 256), (13, 256), (2, 4, 256)], ids=str)
def test_int4_linear_in_calls_of_four_rows_equals_one_call(shape):
    """The W4A16 linear's op runs 5-31 rows as calls of 4 of vLLM's int4 linear: bit for bit one
    call of vLLM's kernel on all the rows, with uneven remainders (5 = 4 + 1) and 3-D input."""
    skip_without_vllm_int4_linear()
    from vllm_ernie_moe.quant.int4 import int4_linear, vllm_int4_blocked
    from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

    generator = torch.Generator().manual_seed(5)
    values = torch.randint(-8, 8, (96, 256), generator=generator, dtype=torch.int8)
    scale = (torch.rand(256 // 32, 96, generator=generator) * 0.01 + 1e-3).bfloat16()
    weight = vllm_int4_blocked(pack_int4_rows(values), scale)
    x = torch.randn(*shape, generator=generator).bfloat16()
    one_call = torch.ops._C.int4_scaled_mm_cpu(x.reshape(-1, 256), *weight, None)
    assert torch.equal(int4_linear(x, *weight), one_call.view(*shape[:-1], 96))
