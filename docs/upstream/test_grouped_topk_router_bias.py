# Upstream location: vllm-ascend tests/ut/ops/test_grouped_topk_router_bias.py (CPU unit test; the
# torch_npu stubs of tests/ut/conftest.py are enough).
"""AscendGroupedTopKRouter without expert groups: the correction bias chooses the experts, the
unbiased scores weight them (as its grouped branch and vLLM's FusedTopKBiasRouter do). 300I DUO
(310P) routes every biased softmax MoE layer, e.g. ERNIE-4.5, through this branch."""

import pytest
import torch
from vllm_ascend.ops.fused_moe.router.grouped_topk_router import AscendGroupedTopKRouter


def make_router(bias, top_k, scoring_func):
    return AscendGroupedTopKRouter(
        top_k=top_k,
        global_num_experts=bias.numel(),
        num_expert_group=None,
        topk_group=None,
        renormalize=True,
        scoring_func=scoring_func,
        e_score_correction_bias=bias,
    )


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_bias_chooses_unbiased_scores_weigh(scoring_func):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 8, generator=g) * 2
    bias = torch.zeros(8)
    bias[6:] = 0.5
    router = make_router(bias, 2, scoring_func)
    weights, ids = router._compute_routing(logits, logits, torch.int32)
    scores = logits.softmax(-1) if scoring_func == "softmax" else logits.sigmoid()
    ref_ids = (scores + bias).topk(2, dim=-1).indices
    ref_weights = scores.gather(1, ref_ids)
    ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    assert torch.equal(ids.long().sort(-1).values, ref_ids.sort(-1).values)
    for row in range(logits.shape[0]):
        got = dict(zip(ids[row].tolist(), weights[row].tolist()))
        for expert, weight in zip(ref_ids[row].tolist(), ref_weights[row].tolist()):
            assert got[expert] == pytest.approx(weight, abs=1e-6)
