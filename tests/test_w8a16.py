"""msModelSlim W8A16 (int8 per-channel weights, activations unquantized) on vLLM's CPU backend,
both ways the plugin serves it: int8 in memory on the portable weight-only GEMM, and dequantized
at load onto vLLM's unquantized kernels (``VLLM_ERNIE_MOE_W8A16_INT8=1`` / ``0``).

Fixture ``ernie-tiny-w8a16-msmodelslim``: what msModelSlim 26.1.0 wrote for ``ernie-tiny-bf16``
(``MODE=w8a16 tests/fixtures/msmodelslim/recipe.sh``). References: transformers in fp32 on the
checkpoint with ``int8 * scale`` written back (independent of the plugin's loader), and vLLM's own
unquantized path on that same dequantized checkpoint: bit for bit equal to the dequantized mode,
within bf16 rounding of the int8 one.
"""

import os
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

from vllm_ernie_moe.quant.config import w8a16_int8_in_memory

FIXTURES = Path(__file__).parent / "fixtures"
W8A16 = FIXTURES / "ernie-tiny-w8a16-msmodelslim"
BF16_SOURCE = FIXTURES / "ernie-tiny-bf16"
MAX_TOKENS, TOP_K = 32, 5
INT8, DEQUANTIZED, AUTO = "1", "0", ""  # VLLM_ERNIE_MOE_W8A16_INT8

# (checkpoint, tensor parallel size, W8A16 mode)
ENGINES = [
    ("w8a16", 1, INT8),
    ("w8a16", 1, DEQUANTIZED),
    ("dequantized", 1, AUTO),
    ("w8a16", 2, AUTO),  # this CPU's default mode
]
_results: dict[tuple, list] = {}


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory) -> Path:
    return dequantized_checkpoint(W8A16, tmp_path_factory.mktemp("w8a16") / "dequantized")


@pytest.fixture(scope="module", params=ENGINES, ids=lambda e: f"{e[0]}-tp{e[1]}-int8={e[2]}")
def engine(request, dequantized):
    checkpoint, tp, mode = request.param
    path = W8A16 if checkpoint == "w8a16" else dequantized
    saved = os.environ.get("VLLM_ERNIE_MOE_W8A16_INT8")
    os.environ["VLLM_ERNIE_MOE_W8A16_INT8"] = mode
    try:
        _results[request.param] = vllm_greedy(path, "bfloat16", tp, MAX_TOKENS, TOP_K)
    finally:
        os.environ.pop("VLLM_ERNIE_MOE_W8A16_INT8")
        if saved is not None:
            os.environ["VLLM_ERNIE_MOE_W8A16_INT8"] = saved
    return request.param, _results[request.param]


def test_matches_fp32_reference_on_dequantized_weights(engine, dequantized):
    if engine[0] not in ENGINES[:2]:
        pytest.skip("compared once per mode, at TP=1")
    reference = transformers_greedy(dequantized, "float32", MAX_TOKENS, TOP_K)
    check_logprobs_close(reference, engine[1])
    assert_bf16_drift(reference, engine[1])
    # The int8 weights move the logits: the BF16 source's are not these, so the check can fail.
    source = transformers_greedy(BF16_SOURCE, "float32", MAX_TOKENS, TOP_K)
    assert logprob_drift(source, reference).max() > 1e-3


def test_against_the_unquantized_path_on_the_same_weights(engine):
    """Dequantized at load: bf16(int8 * scale), as loading the fp32 product gives, bit for bit.
    Int8 in memory: the portable GEMM rounds elsewhere, within vLLM's closeness rule."""
    if engine[0] != ENGINES[2]:
        pytest.skip("the dequantized checkpoint's engine")
    for got, want in zip(engine[1], _results[ENGINES[1]], strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs
    check_logprobs_close(engine[1], _results[ENGINES[0]])
    assert_bf16_drift(engine[1], _results[ENGINES[0]])


def test_tensor_parallel_matches_tp1(engine, monkeypatch):
    if engine[0] != ENGINES[3]:
        pytest.skip("TP=1 is the baseline")
    monkeypatch.setenv("VLLM_ERNIE_MOE_W8A16_INT8", AUTO)  # the mode the TP=2 engine ran in
    baseline = _results[ENGINES[0] if w8a16_int8_in_memory() else ENGINES[1]]
    check_logprobs_close(baseline, engine[1])
    assert_bf16_drift(baseline, engine[1])


def int8_quantized_kinds(model) -> list[str]:
    """Run in the engine's worker: the kinds of W8A16 modules, each asserted to hold int8."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_ernie_moe.quant.linear import ErnieW8A16LinearMethod
    from vllm_ernie_moe.quant.moe import ErnieW8A16MoEMethod

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


def test_int8_mode_keeps_the_weights_int8_in_memory(monkeypatch):
    """Half the bytes of bf16 (the 21B: ~22 GB instead of ~43 GB)."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function
    monkeypatch.setenv("VLLM_ERNIE_MOE_W8A16_INT8", INT8)
    llm = LLM(model=str(W8A16), dtype="bfloat16", max_model_len=256, enforce_eager=True)
    try:
        assert llm.apply_model(int8_quantized_kinds) == [["experts", "linear"]]
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize(
    "tier, setting, int8",
    [
        ("avx2", AUTO, True),
        ("avx512", AUTO, True),
        ("avx512_bf16", AUTO, False),
        (None, AUTO, False),  # not x86 (Arm): vLLM's bf16 kernels, as before
        ("avx512_bf16", INT8, True),
        ("avx2", DEQUANTIZED, False),
    ],
)
def test_default_mode_follows_the_measured_kernels(monkeypatch, tier, setting, int8):
    """Int8 in memory by default on x86 tiers without AVX-512 BF16 (docs/w8a8.md); the setting
    wins either way."""
    from vllm_ernie_moe import cpu_tier

    by_name = {t.name: t for t in cpu_tier.TIERS}
    monkeypatch.setattr(cpu_tier, "active", lambda: by_name.get(tier))
    monkeypatch.setenv("VLLM_ERNIE_MOE_W8A16_INT8", setting)
    assert w8a16_int8_in_memory() is int8
