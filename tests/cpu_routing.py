"""vLLM's CPU MoE routing on whichever target the installed vLLM has (see patch_cpu_router):
0.32+'s ``CPURouter._compute_routing`` or 0.27's ``cpu_fused_moe.select_experts``."""

import torch

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches import patch_cpu_router


def route(
    logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None, original: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) from vLLM's CPU routing for softmax scoring, renormalised; patched unless
    ``original``."""
    patch_cpu_router.apply()
    owner, name = compat.cpu_routing_target()
    function = getattr(owner, name)
    if original:
        function = function.__wrapped__
    if name == "_compute_routing":
        router = owner(
            top_k=top_k,
            global_num_experts=logits.shape[-1],
            renormalize=True,
            scoring_func="softmax",
            e_score_correction_bias=bias,
        )
        return function(router, logits, logits, None)
    return function(
        hidden_states=logits,
        router_logits=logits,
        top_k=top_k,
        use_grouped_topk=False,
        renormalize=True,
        e_score_correction_bias=bias,
    )
