"""ERNIE routing through vLLM's (patched) CPU router, against a hand-written reference.

Reference (notes/ernie45-moe.md): p = softmax(logits) in fp32; choose the top-k of p + bias; weight
the chosen experts by the unbiased p, renormalised to sum 1.
"""

import math

import pytest
import torch
from cpu_routing import route as cpu_route


def reference_route(logits: list[float], bias: list[float], k: int) -> dict[int, float]:
    """Plain-Python (float64) ERNIE routing for one token: expert id -> weight."""
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    p = [e / sum(exps) for e in exps]
    chosen = sorted(range(len(p)), key=lambda e: -(p[e] + bias[e]))[:k]
    total = sum(p[e] for e in chosen)
    return {e: p[e] / total for e in chosen}


def route(bias: torch.Tensor, top_k: int, logits: torch.Tensor) -> list[dict[int, float]]:
    weights, ids = cpu_route(logits, top_k, bias=bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(ids, weights)]


@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 6), (64, 8)])
def test_matches_reference_and_bias_changes_choice(experts, top_k):
    g = torch.Generator().manual_seed(experts + top_k)
    logits = torch.randn(32, experts, generator=g) * 2
    bias = torch.randn(experts, generator=g) * 0.05
    got = route(bias, top_k, logits)
    changed = 0
    for row, routed in zip(logits.tolist(), got):
        expected = reference_route(row, bias.tolist(), top_k)
        assert routed.keys() == expected.keys()
        for e in expected:
            assert routed[e] == pytest.approx(expected[e], abs=1e-6)
        changed += expected.keys() != reference_route(row, [0.0] * experts, top_k).keys()
    assert changed > 0, "the bias must change the chosen experts, or this test proves nothing"


def test_bias_only_chooses_weights_stay_unbiased():
    # Expert 2 has the lowest probability but a bias that forces it into the top 2.
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    (routed,) = route(bias, 2, logits)
    p = torch.softmax(logits[0].double(), -1)
    assert routed.keys() == {0, 2}
    assert routed[2] == pytest.approx((p[2] / (p[0] + p[2])).item(), abs=1e-7)


def test_ties_choose_a_valid_top_k_with_equal_weights():
    logits = torch.zeros(4, 8)
    logits[:, 5] = 1.0  # one clear winner, then a seven-way tie for the second place
    (routed, *_) = route(torch.zeros(8), 2, logits)
    assert 5 in routed and len(routed) == 2
    other = next(e for e in routed if e != 5)
    p = torch.softmax(logits[0].double(), -1)
    assert routed[other] == pytest.approx((p[other] / (p[5] + p[other])).item(), abs=1e-7)


def test_ties_agree_with_transformers_router():
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    config = Ernie4_5_MoeConfig(hidden_size=8, moe_num_experts=16, moe_k=4)
    hf = Ernie4_5_MoeTopKRouter(config)
    with torch.no_grad():
        hf.weight.copy_(torch.eye(16, 8).round())  # experts 8..15 get identical zero logits
        hf.moe_statics.e_score_correction_bias.zero_()
        hidden = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
        logits, hf_weights, hf_ids = hf(hidden)
    got = route(torch.zeros(16), 4, logits)
    for routed, ids, weights in zip(got, hf_ids, hf_weights):
        assert routed.keys() == set(ids.tolist())
        for e, w in zip(ids.tolist(), weights.tolist()):
            assert routed[e] == pytest.approx(w, abs=1e-6)


def test_math_is_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 64, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(64, generator=g) * 0.01
    got = route(bias, 6, logits)
    for row, routed in zip(logits.float().tolist(), got):
        expected = reference_route(row, bias.tolist(), 6)
        assert routed.keys() == expected.keys()
        for e in expected:
            assert routed[e] == pytest.approx(expected[e], abs=1e-6)
