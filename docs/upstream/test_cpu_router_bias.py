# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
# Upstream location: tests/kernels/moe/test_cpu_router_bias.py (runs on CPU, no kernels needed).
"""CPURouter must honour e_score_correction_bias for softmax scoring without expert groups:
choose the top-k of softmax + bias, weight by the unbiased softmax (FusedTopKBiasRouter's rule,
used by ERNIE-4.5 MoE)."""

import pytest
import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter


def reference(logits, bias, top_k, renormalize):
    scores = torch.softmax(logits.double(), dim=-1)
    ids = torch.topk(scores + bias.double(), top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (64, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_honours_correction_bias(num_experts, top_k, renormalize):
    g = torch.Generator().manual_seed(num_experts + top_k)
    logits = torch.randn(32, num_experts, generator=g) * 2
    bias = torch.randn(num_experts, generator=g) * 0.05
    router = CPURouter(
        top_k=top_k,
        global_num_experts=num_experts,
        renormalize=renormalize,
        scoring_func="softmax",
        e_score_correction_bias=bias,
    )
    weights, ids = router._compute_routing(logits, logits, None)
    ref_weights, ref_ids = reference(logits, bias, top_k, renormalize)
    unbiased_ids = torch.topk(logits, top_k, dim=-1).indices
    # The bias must change the choice somewhere, or this test proves nothing.
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(ref_ids, unbiased_ids))
    for row in range(logits.shape[0]):
        got = dict(zip(ids[row].tolist(), weights[row].tolist()))
        want = dict(zip(ref_ids[row].tolist(), ref_weights[row].tolist()))
        assert got.keys() == want.keys()
        for expert, weight in want.items():
            assert got[expert] == pytest.approx(weight, abs=1e-6)


def test_softmax_topk_without_bias_is_unchanged():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    router = CPURouter(top_k=2, global_num_experts=8, renormalize=True, scoring_func="softmax")
    weights, ids = router._compute_routing(logits, logits, None)
    ref_vals, ref_ids = torch.topk(logits, 2, dim=-1)
    assert torch.equal(ids.sort(dim=-1).values, ref_ids.to(torch.int32).sort(dim=-1).values)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(4))
