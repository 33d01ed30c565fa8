"""Patch: vLLM's CPU MoE router ignores ``e_score_correction_bias`` in softmax routing.

- Target: ``vllm.model_executor.layers.fused_moe.router.cpu_router.CPURouter._compute_routing``.
- Why: for softmax scoring without expert groups, vLLM 0.32's ``CPURouter`` takes a plain softmax
  top-k and drops the correction bias. ERNIE-4.5 chooses its experts by ``softmax + bias``, so on
  the CPU backend every MoE layer silently runs the wrong experts (GPU/NPU routers honour the bias).
- How: in exactly that case (softmax, no groups, no custom routing function, a bias present),
  choose the top-k of ``softmax(logits) + bias`` and weight them by the unbiased softmax,
  renormalised: the math of vLLM's own ``FusedTopKBiasRouter`` and of transformers. Every other case
  goes to the original method.
- Upstream: not fixed in vLLM 0.32.0 (``_softmax_topk`` in ``router/cpu_router.py`` has no bias
  argument); no upstream issue found at the time of writing.
- Applies to: vLLM ``>=0.32,<0.33``. On another version a behavioural probe decides: it is applied
  (with a warning) only if the probe still sees the bias ignored.
- Remove when: the probe reports the bias honoured on every supported vLLM version (the plugin
  logs "not needed"), i.e. upstream ``CPURouter`` routes softmax with a correction bias.
- Test: ``tests/test_patch_cpu_router.py``.
"""

from __future__ import annotations

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

APPLIES_TO = SpecifierSet(">=0.32,<0.33")


def biased_softmax_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts by ``softmax + bias``, weight them by the unbiased softmax (fp32)."""
    scores = torch.softmax(router_logits.float(), dim=-1)
    topk_ids = torch.topk(scores + e_score_correction_bias.float().unsqueeze(0), top_k, dim=-1)[1]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    # The CPU MoE kernels read contiguous float32 / int32 buffers.
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()


def _needs_bias(router) -> bool:
    return (
        router.e_score_correction_bias is not None
        and router.scoring_func == "softmax"
        and not router.use_grouped_topk
        and router.custom_routing_function is None
    )


def _ignores_bias(router_cls) -> bool:
    """Probe: does this router pick expert 0 although the bias makes expert 1 the clear choice?"""
    router = router_cls(
        top_k=1,
        global_num_experts=2,
        renormalize=True,
        scoring_func="softmax",
        e_score_correction_bias=torch.tensor([0.0, 10.0]),
    )
    logits = torch.tensor([[1.0, 0.0]])
    _, topk_ids = router._compute_routing(logits, logits, None)
    return int(topk_ids[0, 0]) == 0


def apply() -> bool:
    """Patch ``CPURouter`` on the CPU platform if needed; idempotent. True when active."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    original = CPURouter._compute_routing
    if getattr(original, "_vllm_ernie_moe_patch", False):
        return True
    version = Version(vllm.__version__)
    if not _ignores_bias(CPURouter):
        logger.info(
            "vLLM %s CPURouter honours the correction bias: patch_cpu_router not needed.", version
        )
        return False
    if version not in APPLIES_TO:
        logger.warning(
            "vLLM %s is outside %s, but its CPURouter still ignores the correction bias: "
            "applying patch_cpu_router.",
            version,
            APPLIES_TO,
        )

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        if _needs_bias(self):
            return biased_softmax_topk(
                router_logits, self.e_score_correction_bias, self.top_k, self.renormalize
            )
        return original(self, hidden_states, router_logits, indices_type, **kwargs)

    _compute_routing._vllm_ernie_moe_patch = True  # type: ignore[attr-defined]
    _compute_routing.__wrapped__ = original  # type: ignore[attr-defined]
    CPURouter._compute_routing = _compute_routing
    logger.info("Patched vLLM CPURouter to honour e_score_correction_bias (patch_cpu_router).")
    return True
