"""patch_cpu_router: detects vLLM's bias-dropping CPU router, fixes it, leaves the rest alone."""

import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

from vllm_ernie_moe.patches import patch_cpu_router


def _router(**kwargs) -> CPURouter:
    return CPURouter(top_k=1, global_num_experts=2, renormalize=True, **kwargs)


def test_unpatched_vllm_ignores_the_bias():
    """The bug the patch exists for; when this fails, upstream fixed it: remove the patch."""
    patch_cpu_router.apply()
    original = CPURouter._compute_routing.__wrapped__
    logits = torch.tensor([[1.0, 0.0]])
    router = _router(scoring_func="softmax", e_score_correction_bias=torch.tensor([0.0, 10.0]))
    _, ids = original(router, logits, logits, None)
    assert ids.item() == 0


def test_apply_is_idempotent_and_fixes_the_probe():
    assert patch_cpu_router.apply() is True
    patched = CPURouter._compute_routing
    assert patch_cpu_router.apply() is True
    assert CPURouter._compute_routing is patched
    assert not patch_cpu_router._ignores_bias(CPURouter)


def test_routing_without_bias_is_unchanged():
    patch_cpu_router.apply()
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    router = CPURouter(top_k=3, global_num_experts=8, renormalize=True, scoring_func="softmax")
    original = CPURouter._compute_routing.__wrapped__
    for got, want in zip(
        router._compute_routing(logits, logits, None), original(router, logits, logits, None)
    ):
        assert torch.equal(got, want)


def test_version_guard_covers_the_pinned_vllm():
    import vllm

    assert vllm.__version__ in patch_cpu_router.APPLIES_TO
