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
- How: in exactly that case (no groups, a bias present; softmax, sigmoid or sqrtsoftplus) choose and
  weight by ERNIE's rule (``vllm_ernie_moe.routing.biased_topk``), then renormalise and scale as the
  original does. The method is replaced on the class itself, which both subclasses
  (``AscendFusedTopKRouter``, ``AscendGroupedTopKRouter310``) reach through ``super()``.
- Decided by behaviour: only on an NPU with vllm-ascend installed, and only if a probe (one token,
  two experts, computed on CPU tensors) still sees biased weights.
- Upstream: not reported; the fix and its unit test in vllm-ascend's layout are in
  ``docs/upstream/ascend-grouped-topk-router-bias.md``.
- Remove when: the probe reports unbiased weights (the plugin logs "not needed").
- Test: ``tests/test_patch_ascend_grouped_topk_router.py`` runs vllm-ascend's router on CPU (the
  Ascend contract probe, 310P), before and after the patch, against hand-computed weights.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from vllm_ernie_moe.patches.patching import install, logger
from vllm_ernie_moe.routing import SCORE_FUNCTIONS, biased_topk

TARGET_MODULE = "vllm_ascend.ops.fused_moe.router.grouped_topk_router"


def grouped_topk_router_class():
    return importlib.import_module(TARGET_MODULE).AscendGroupedTopKRouter


def _weights_are_biased(router_cls, route) -> bool:
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


def _weighted_by_unbiased_scores(original):
    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        bias = self.e_score_correction_bias
        if self.use_grouped_topk or bias is None or self.scoring_func not in SCORE_FUNCTIONS:
            return original(self, hidden_states, router_logits, indices_type, **kwargs)
        scores = SCORE_FUNCTIONS[self.scoring_func](router_logits)
        topk_weights, topk_ids = biased_topk(scores, bias, self.top_k)
        topk_weights = topk_weights.to(hidden_states.dtype)
        topk_weights = self._renormalize_topk_weights(topk_weights) * self.routed_scaling_factor
        return topk_weights, topk_ids.to(torch.int32)

    return _compute_routing


def patch_router_class(router_cls) -> bool:
    """Replace ``_compute_routing`` on ``router_cls`` if the probe sees the bug; idempotent."""
    return install(
        __name__, router_cls, "_compute_routing", _weighted_by_unbiased_scores,
        bug_present=functools.partial(_weights_are_biased, router_cls),
        fixed="weights by the unbiased scores",
    )  # fmt: skip


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
