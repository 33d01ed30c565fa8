"""ERNIE MTP speculative decoding with the plugin's drafter: every proposal equals Baidu's reference
forward (``mtp_reference.py``, fp32), and speculation is lossless against transformers."""

import json
from types import SimpleNamespace

import pytest
import torch
from mtp_reference import drafts_vllm_asks_for, reference_drafts
from reference import prompt_token_ids, transformers_greedy
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_ernie_moe.mtp import ErnieMTP

MAX_TOKENS = 24


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def engine(checkpoint, request, monkeypatch_module):
    path = checkpoint("tiny-21b", mtp=True)
    # The drafts are read out of the workers through collective_rpc with a function.
    monkeypatch_module.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if request.param > 1:  # on one NUMA node, TP=2 on CPU needs an explicit core per rank
        monkeypatch_module.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(
        model=str(path),
        dtype="float32",
        tensor_parallel_size=request.param,
        max_model_len=512,
        enforce_eager=True,
        speculative_config={"method": "ernie_mtp", "num_speculative_tokens": 1},
        seed=0,
    )
    llm.collective_rpc(_record_drafts)
    yield path, llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _record_drafts(worker) -> None:
    drafter = worker.model_runner.drafter
    propose = drafter.propose
    drafter.recorded = []

    def recording(*args, **kwargs):
        drafts = propose(*args, **kwargs)
        drafter.recorded.append(drafts.tolist())
        return drafts

    drafter.propose = recording


def _take_drafts(worker) -> list:
    drafter = worker.model_runner.drafter
    recorded, drafter.recorded = drafter.recorded, []
    return recorded


def _drafter_class(worker) -> str:
    model = worker.model_runner.drafter.model
    return f"{type(model).__module__}.{type(model).__name__}"


def test_the_plugins_drafter_serves_ernie_mtp(engine):
    _, llm = engine
    assert set(llm.collective_rpc(_drafter_class)) == {"vllm_ernie_moe.mtp.ErnieMTP"}


def test_every_proposal_equals_the_reference_and_output_is_lossless(engine):
    path, llm = engine
    reference = transformers_greedy(path, "float32", MAX_TOKENS, 1)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for ids, expected in zip(prompt_token_ids(path), reference, strict=True):
        llm.collective_rpc(_take_drafts)
        (output,) = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
        recorded, *other_ranks = llm.collective_rpc(_take_drafts)
        assert all(rank == recorded for rank in other_ranks)
        tokens = list(output.outputs[0].token_ids)
        assert tokens == expected.token_ids, "speculative decoding changed the greedy output"
        sequence = ids + tokens
        wanted = drafts_vllm_asks_for(
            sequence, len(ids), reference_drafts(path, sequence), MAX_TOKENS
        )
        proposed = [step[0][0] for step in recorded]
        # vLLM may draft once more in the step that finishes the request.
        assert wanted and proposed[: len(wanted)] == wanted
        assert len(proposed) - len(wanted) in (0, 1)


@pytest.mark.parametrize(
    "variant", [{"final_norm": False}, {"zero_position_0": True}], ids=["no-final-norm", "pos0"]
)
def test_vllms_variants_draft_differently_here(checkpoint, variant):
    """Guards the test above: each of vLLM's departures from the reference changes drafts on
    this checkpoint, so a drafter with one of them fails there."""
    path = checkpoint("tiny-21b", mtp=True)
    sequence = prompt_token_ids(path)[1] + list(range(3, 3 + MAX_TOKENS))
    assert reference_drafts(path, sequence) != reference_drafts(path, sequence, **variant)


def test_a_transposed_projection_is_read_either_way():
    """300B-A47B's ``mtp_linear_proj`` is reported stored [2H, H] (SGLang PR #7657)."""
    drafter = SimpleNamespace(config=SimpleNamespace(hidden_size=2))
    stored = torch.arange(8.0).reshape(4, 2)
    ((name, tensor),) = ErnieMTP._mtp_tensors(drafter, [("model.mtp_linear_proj.0.weight", stored)])
    assert torch.equal(tensor, stored.t())
    kept = ErnieMTP._mtp_tensors(drafter, [("model.layers.0.mlp.down_proj.weight", stored)])
    assert list(kept) == []


@pytest.mark.parametrize("declared", ["absent", None])
def test_a_checkpoint_without_an_mtp_head_is_refused_before_the_engine_starts(
    checkpoint, tmp_path, declared
):
    """Without the key, and with it null (transformers 5.25's default, where vLLM alone fails with
    a pydantic error: patch_ernie_mtp_layer_count): the plugin names the setting and the fix."""
    from vllm.engine.arg_utils import EngineArgs

    source = checkpoint("tiny-21b")
    for item in source.iterdir():
        (tmp_path / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    if declared != "absent":
        config["num_nextn_predict_layers"] = declared
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = EngineArgs(
        model=str(tmp_path),
        speculative_config={"method": "ernie_mtp", "num_speculative_tokens": 1},
        max_model_len=512,
    )
    refusal = r"declares no num_nextn_predict_layers.*needs the MTP head"
    with pytest.raises(ValueError, match=refusal):
        args.create_engine_config()


def test_the_quantizer_keeps_the_mtp_head_in_floating_point(checkpoint, tmp_path):
    """msModelSlim drops the head; vllm-ernie-moe-quantize writes it as it is, labelled FLOAT."""
    from reference import load_tensors

    from vllm_ernie_moe.tools.quantize import quantize_checkpoint

    path = checkpoint("tiny-21b", mtp=True)
    out = quantize_checkpoint(path, tmp_path / "w8a8")
    source, written = load_tensors(path), load_tensors(out)
    labels = json.loads((out / "quant_model_description.json").read_text())
    head = [name for name in source if ".mtp_" in name]
    assert len(head) == 12
    for name in head:
        assert torch.equal(written[name], source[name]) and labels[name] == "FLOAT", name
