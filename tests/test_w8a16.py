"""msModelSlim W8A16 (int8 per-channel weights, activations unquantized) on vLLM's CPU backend.

Fixture ``ernie-tiny-w8a16-msmodelslim``: what msModelSlim 26.1.0 wrote for ``ernie-tiny-bf16``
(``MODE=w8a16 tests/fixtures/msmodelslim/recipe.sh``). References: transformers in fp32 on the
checkpoint with ``int8 * scale`` written back (independent of the plugin's loader), and vLLM's own
unquantized path on that same dequantized checkpoint, which must give the same numbers bit for bit.
"""

from pathlib import Path

import pytest
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


def test_equals_the_unquantized_path_on_the_same_weights(engine):
    """Dequantizing at load gives bf16(int8 * scale), as loading the fp32 product does."""
    if engine[0] != ENGINES[1]:
        pytest.skip("the dequantized checkpoint's engine")
    for got, want in zip(engine[1], _results[ENGINES[0]], strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs


def test_tensor_parallel_matches_tp1(engine):
    if engine[0] != ENGINES[2]:
        pytest.skip("TP=1 is the baseline")
    check_logprobs_close(_results[ENGINES[0]], engine[1])
    assert_bf16_drift(_results[ENGINES[0]], engine[1])
