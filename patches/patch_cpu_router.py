"""Patch: vLLM's CPU MoE routing ignores ``e_score_correction_bias`` in softmax routing.

- Targets (whichever the installed vLLM has; ``vllm_ernie_moe.compat`` tells which):
  1. vLLM 0.32+: ``CPURouter._compute_routing`` in
     ``vllm.model_executor.layers.fused_moe.router.cpu_router``;
  2. vLLM 0.27: ``vllm.model_executor.layers.fused_moe.cpu_fused_moe.select_experts``, which every
     CPU expert kernel calls (module global, or imported inside ``apply`` at call time).
- Why: for softmax scoring without expert groups both take a plain softmax top-k and drop the
  correction bias. ERNIE-4.5 chooses its experts by ``softmax + bias``, so on the CPU backend every
  MoE layer silently runs the wrong experts (GPU/NPU routers honour the bias).
- How: in exactly that case (softmax, no groups, no custom routing function, a bias present),
  route by ERNIE's rule (``vllm_ernie_moe.routing.ernie_topk``: the math of vLLM's own
  ``FusedTopKBiasRouter`` and of transformers). Every other case goes to the original function.
- Decided by behaviour: a probe routes one token between two experts where only the bias makes
  expert 1 the choice; the patch applies exactly when the probe sees expert 0 (bug present), on any
  version. Where neither target exists it says so once and stays off.
- Upstream: present in vLLM 0.27.1 (``select_experts`` uses the bias only for grouped top-k),
  0.32.0 and 0.33.0 (``_softmax_topk`` has no bias argument); no upstream issue found.
  Upstream-ready fix with its test: ``docs/upstream/cpu-router-bias.md``.
- Remove when: the probe reports the bias honoured on every supported vLLM version (the plugin
  logs "not needed"), i.e. upstream ``CPURouter`` routes softmax with a correction bias.
- Test: ``tests/test_patch_cpu_router.py``.
"""

from __future__ import annotations

import functools

import torch

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches.patching import install, logger
from vllm_ernie_moe.routing import ernie_topk


def _needs_bias(bias, scoring_func: str, grouped: bool, custom_routing_function) -> bool:
    return (
        bias is not None
        and scoring_func == "softmax"
        and not grouped
        and (custom_routing_function is None)
    )


#: One token, two experts: the logits pick expert 0, the bias makes expert 1 the clear choice.
_PROBE_LOGITS = torch.tensor([[1.0, 0.0]])
_PROBE_BIAS = torch.tensor([0.0, 10.0])


def _router_ignores_bias(router_cls, route) -> bool:
    """Probe ``route``, vLLM 0.32+'s ``CPURouter._compute_routing``."""
    router = router_cls(
        top_k=1,
        global_num_experts=2,
        renormalize=True,
        scoring_func="softmax",
        e_score_correction_bias=_PROBE_BIAS,
    )
    _, topk_ids = route(router, _PROBE_LOGITS, _PROBE_LOGITS, None)
    return int(topk_ids[0, 0]) == 0


def _select_experts_ignores_bias(select_experts) -> bool:
    """Probe vLLM 0.27's ``cpu_fused_moe.select_experts``."""
    _, topk_ids = select_experts(
        hidden_states=_PROBE_LOGITS,
        router_logits=_PROBE_LOGITS,
        top_k=1,
        use_grouped_topk=False,
        renormalize=True,
        e_score_correction_bias=_PROBE_BIAS,
    )
    return int(topk_ids[0, 0]) == 0


def _routing_with_bias(original):
    """``CPURouter._compute_routing`` that routes softmax with a correction bias by ERNIE's rule."""

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        if _needs_bias(
            self.e_score_correction_bias,
            self.scoring_func,
            self.use_grouped_topk,
            self.custom_routing_function,
        ):
            return ernie_topk(
                router_logits, self.e_score_correction_bias, self.top_k, self.renormalize
            )
        return original(self, hidden_states, router_logits, indices_type, **kwargs)

    return _compute_routing


def _select_experts_with_bias(original):
    """0.27's ``select_experts`` that routes softmax with a correction bias by ERNIE's rule."""

    def select_experts(
        hidden_states,
        router_logits,
        top_k,
        use_grouped_topk,
        renormalize,
        custom_routing_function=None,
        scoring_func="softmax",
        routed_scaling_factor=1.0,
        e_score_correction_bias=None,
        **kwargs,
    ):
        if routed_scaling_factor == 1.0 and _needs_bias(
            e_score_correction_bias, scoring_func, use_grouped_topk, custom_routing_function
        ):
            return ernie_topk(router_logits, e_score_correction_bias, top_k, renormalize)
        return original(
            hidden_states=hidden_states,
            router_logits=router_logits,
            top_k=top_k,
            use_grouped_topk=use_grouped_topk,
            renormalize=renormalize,
            custom_routing_function=custom_routing_function,
            scoring_func=scoring_func,
            routed_scaling_factor=routed_scaling_factor,
            e_score_correction_bias=e_score_correction_bias,
            **kwargs,
        )

    return select_experts


def apply() -> bool:
    """Patch vLLM's CPU routing on the CPU platform if the probe sees the bug; idempotent.
    True when active."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    fixed = "routes softmax + e_score_correction_bias by ERNIE's rule"
    target = compat.cpu_routing_target()
    if target is not None:
        owner, name = target
        replacement, bug_present = {
            "_compute_routing": (
                _routing_with_bias,
                functools.partial(_router_ignores_bias, owner),
            ),
            "select_experts": (_select_experts_with_bias, _select_experts_ignores_bias),
        }[name]
        return install(__name__, owner, name, replacement, bug_present=bug_present, fixed=fixed)
    logger.warning(
        "vLLM %s has neither %s nor %s: patch_cpu_router not applied; check that CPU MoE "
        "routing honours e_score_correction_bias (tests/test_routing.py).",
        compat.vllm_version(),
        compat.CPU_ROUTER_MODULE,
        compat.CPU_SELECT_EXPERTS_MODULE,
    )
    return False
