"""ERNIE-4.5's MoE routing rule, defined once.

The router's scores plus ``e_score_correction_bias`` choose the top-k experts; the unbiased scores
of the chosen experts weight them (renormalised to sum 1 in ERNIE's config). This is transformers'
``Ernie4_5_MoeTopKRouter`` and vLLM's ``FusedTopKBiasRouter``. On GPU, NPU (A2/A3) and in vLLM's
0.32+ MoE runner the model hands its bias to vLLM, which routes; the plugin routes itself only
where a vLLM or vllm-ascend path gets this wrong or routes inside a kernel it replaces: the CPU
router patch, the vllm-ascend 310P router patch, and vLLM 0.27's quantized CPU experts. All of
them call this module.
"""

from __future__ import annotations

import torch

#: Router scores per ``scoring_func`` (ERNIE uses softmax; vllm-ascend's router takes the others).
SCORE_FUNCTIONS = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: torch.nn.functional.softplus(logits).sqrt(),
}


def biased_topk(
    scores: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids): the top-k of ``scores + bias``, weighted by ``scores`` (not renormalised)."""
    topk_ids = (scores + bias.to(scores.dtype)).topk(top_k, dim=-1)[1]
    return scores.gather(-1, topk_ids), topk_ids


def ernie_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE's routing of ``router_logits`` in fp32 as vLLM's CPU expert kernels read it:
    contiguous float32 weights and int32 ids."""
    scores = SCORE_FUNCTIONS["softmax"](router_logits.float())
    if e_score_correction_bias is None:
        topk_weights, topk_ids = scores.topk(top_k, dim=-1)
    else:
        topk_weights, topk_ids = biased_topk(scores, e_score_correction_bias.float(), top_k)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()
