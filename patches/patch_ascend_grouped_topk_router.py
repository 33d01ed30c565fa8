"""Patch: vllm-ascend's non-fused MoE router returns ``softmax + bias`` as the expert weights.

- Target: ``vllm_ascend.ops.fused_moe.router.grouped_topk_router.AscendGroupedTopKRouter.
  _compute_routing`` (vllm-ascend main, checked at commit 182b75e).
- Why: without expert groups it adds ``e_score_correction_bias`` to the scores and returns the
  top-k of that sum as both the choice and the *weights*. ERNIE-4.5 (and vLLM's own
  ``FusedTopKBiasRouter``) weights the chosen experts by the unbiased scores. The right experts run
  with wrong weights, silently, e.g. [0.503, 0.497] where ERNIE gives [0.525, 0.475]. On 300I DUO
  (310P) every ERNIE MoE layer takes this path (``AscendGroupedTopKRouter310`` delegates to it
  whenever a bias is present); on A2/A3 the fused ``moe_gating_top_k`` kernel is right and this is
  only the fallback.
- How: in exactly that case (no groups, a bias present; softmax, sigmoid or sqrtsoftplus) choose the
  top-k of ``scores + bias`` and gather the unbiased scores, then renormalise and scale as the
  original does. The method is replaced on the class itself, which both subclasses
  (``AscendFusedTopKRouter``, ``AscendGroupedTopKRouter310``) reach through ``super()``.
- Decided by behaviour: only on an NPU with vllm-ascend installed, and only if a probe (one token,
  two experts, computed on CPU tensors) still sees biased weights.
- Upstream: not reported; the fix and its unit test in vllm-ascend's layout are in
  ``docs/upstream/ascend-grouped-topk-router-bias.md``.
- Remove when: the probe reports unbiased weights (the plugin logs "not needed").
- Test: ``tests/test_ascend_contract.py`` runs vllm-ascend's router on CPU (310P and A2), before and
  after the patch, against hand-computed weights.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

TARGET_MODULE = "vllm_ascend.ops.fused_moe.router.grouped_topk_router"
#: The scores the original computes, per scoring function.
SCORES = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: torch.nn.functional.softplus(logits).sqrt(),
}


def grouped_topk_router_class():
    return importlib.import_module(TARGET_MODULE).AscendGroupedTopKRouter


def unpatched(router_cls):
    routing = router_cls._compute_routing
    return routing.__wrapped__ if getattr(routing, "_vllm_ernie_moe_patch", False) else routing


def _weights_are_biased(route, router_cls) -> bool:
    """Probe: logits [1, 0], bias [0, 0.5], top 2: ERNIE's weights are softmax = [0.731, 0.269]."""
    router = router_cls(
        top_k=2,
        global_num_experts=2,
        num_expert_group=None,
        topk_group=None,
        renormalize=True,
        scoring_func="softmax",
        e_score_correction_bias=torch.tensor([0.0, 0.5]),
    )
    logits = torch.tensor([[1.0, 0.0]])
    weights, ids = route(router, logits, logits, torch.int32)
    weight_of_expert_0 = float(weights[0][ids[0].tolist().index(0)])
    return abs(weight_of_expert_0 - float(torch.softmax(logits, -1)[0, 0])) > 1e-3


def patch_router_class(router_cls) -> bool:
    """Replace ``_compute_routing`` on ``router_cls`` if the probe sees the bug; idempotent."""
    if getattr(router_cls._compute_routing, "_vllm_ernie_moe_patch", False):
        return True
    original = router_cls._compute_routing
    if not _weights_are_biased(original, router_cls):
        logger.info("vllm-ascend's grouped top-k router weights are unbiased: patch not needed.")
        return False

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        bias = self.e_score_correction_bias
        if self.use_grouped_topk or bias is None or self.scoring_func not in SCORES:
            return original(self, hidden_states, router_logits, indices_type, **kwargs)
        scores = SCORES[self.scoring_func](router_logits)
        topk_ids = (scores + bias.to(scores.dtype)).topk(self.top_k, dim=-1)[1]
        topk_weights = scores.gather(1, topk_ids).to(hidden_states.dtype)
        topk_weights = self._renormalize_topk_weights(topk_weights) * self.routed_scaling_factor
        return topk_weights, topk_ids.to(torch.int32)

    _compute_routing._vllm_ernie_moe_patch = True  # type: ignore[attr-defined]
    _compute_routing.__wrapped__ = original  # type: ignore[attr-defined]
    router_cls._compute_routing = _compute_routing
    logger.info("Patched vllm-ascend's grouped top-k router to weight by unbiased scores.")
    return True


def apply() -> bool:
    """On an NPU with vllm-ascend: patch its router if needed. True when active."""
    from vllm.platforms import current_platform

    if current_platform.device_type != "npu" or importlib.util.find_spec("vllm_ascend") is None:
        return False
    try:
        router_cls = grouped_topk_router_class()
    except (ImportError, AttributeError) as error:
        logger.warning(
            "vllm-ascend has no %s (%s): router patch not applied.", TARGET_MODULE, error
        )
        return False
    return patch_router_class(router_cls)
