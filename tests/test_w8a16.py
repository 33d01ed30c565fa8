"""msModelSlim W8A16 (int8 per-channel weights, activations unquantized) on vLLM's CPU backend.

Fixture ``ernie-tiny-w8a16-msmodelslim``: what msModelSlim 26.1.0 wrote for ``ernie-tiny-bf16``
(``MODE=w8a16 tests/fixtures/msmodelslim/recipe.sh``). References: transformers in fp32 on the
checkpoint with ``int8 * scale`` written back (independent of the plugin's loader), and vLLM's own
unquantized path on that same dequantized checkpoint, which must give the same numbers bit for bit.
"""

from pathlib import Path

import pytest
import torch
from reference import (
    assert_bf16_drift,
    check_logprobs_close,
    dequantized_checkpoint,
    logprob_drift,
    transformers_greedy,
    vllm_greedy,
)

FIXTURES = Path(__file__).parent / "fixtures"
W8A16 = FIXTURES / "ernie-tiny-w8a16-msmodelslim"
BF16_SOURCE = FIXTURES / "ernie-tiny-bf16"
MAX_TOKENS, TOP_K = 32, 5

# (checkpoint, tensor parallel size); the first is the baseline of the others.
ENGINES = [("w8a16", 1), ("dequantized", 1), ("w8a16", 2)]
_results: dict[tuple, list] = {}


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory) -> Path:
    return dequantized_checkpoint(W8A16, tmp_path_factory.mktemp("w8a16") / "dequantized")


@pytest.fixture(scope="module", params=ENGINES, ids=lambda e: f"{e[0]}-tp{e[1]}")
def engine(request, dequantized):
    checkpoint, tp = request.param
    path = W8A16 if checkpoint == "w8a16" else dequantized
    _results[request.param] = vllm_greedy(path, "bfloat16", tp, MAX_TOKENS, TOP_K)
    return request.param, _results[request.param]


def test_matches_fp32_reference_on_dequantized_weights(engine, dequantized):
    if engine[0] != ENGINES[0]:
        pytest.skip("compared once, at TP=1")
    reference = transformers_greedy(dequantized, "float32", MAX_TOKENS, TOP_K)
    check_logprobs_close(reference, engine[1])
    assert_bf16_drift(reference, engine[1])
    # The int8 weights move the logits: the BF16 source's are not these, so the check can fail.
    source = transformers_greedy(BF16_SOURCE, "float32", MAX_TOKENS, TOP_K)
    assert logprob_drift(source, reference).max() > 1e-3


def test_int8_in_memory_matches_the_unquantized_path_on_the_same_weights(engine):
    """The int8 weights stay int8 (the portable weight-only GEMM): vLLM's unquantized path on the
    dequantized checkpoint differs only by where bf16 rounds."""
    if engine[0] != ENGINES[1]:
        pytest.skip("the dequantized checkpoint's engine")
    check_logprobs_close(engine[1], _results[ENGINES[0]])
    assert_bf16_drift(engine[1], _results[ENGINES[0]])


def int8_quantized_kinds(model) -> list[str]:
    """Run in the engine's worker: the kinds of W8A16 modules, each asserted to hold int8."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_ernie_moe.quantization import ErnieW8A16LinearMethod, ErnieW8A16MoEMethod

    kinds = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, RoutedExperts) and isinstance(method, ErnieW8A16MoEMethod):
            assert module.w13_weight.dtype == module.w2_weight.dtype == torch.int8
            kinds.add("experts")
        elif isinstance(module, LinearBase) and isinstance(method, ErnieW8A16LinearMethod):
            assert module.weight.dtype == torch.int8
            kinds.add("linear")
    return sorted(kinds)


def test_weights_stay_int8_in_memory(monkeypatch):
    """Half the bytes of bf16: the 21B's W8A16 weights fit a 24 GiB machine only this way."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function
    llm = LLM(model=str(W8A16), dtype="bfloat16", max_model_len=256, enforce_eager=True)
    try:
        assert llm.apply_model(int8_quantized_kinds) == [["experts", "linear"]]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_tensor_parallel_matches_tp1(engine):
    if engine[0] != ENGINES[2]:
        pytest.skip("TP=1 is the baseline")
    check_logprobs_close(_results[ENGINES[0]], engine[1])
    assert_bf16_drift(_results[ENGINES[0]], engine[1])
