"""patch_cpu_router: detects vLLM's bias-dropping CPU routing, fixes it, leaves the rest alone."""

import torch
from cpu_routing import route

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches import patch_cpu_router


def test_this_vllm_has_a_target():
    """If neither target exists the patch stays off: CPU routing must then be checked anew."""
    owner, name = compat.cpu_routing_target()
    assert callable(getattr(owner, name))


def test_unpatched_vllm_ignores_the_bias():
    """The bug the patch exists for; when this fails, upstream fixed it: remove the patch."""
    logits = torch.tensor([[1.0, 0.0]])
    _, ids = route(logits, 1, bias=torch.tensor([0.0, 10.0]), original=True)
    assert ids.item() == 0


def test_patched_routing_matches_hand_computed_math():
    """Choose by softmax + bias, weight by the unbiased softmax renormalised over the chosen."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0])
    weights, ids = route(logits, 2, bias=bias)
    probs = torch.softmax(logits, dim=-1)[0]  # [0.644, 0.237, 0.087, 0.032]
    # softmax + bias = [0.644, 0.237, 0.587, 0.032]: experts 0 and 2, not 0 and 1.
    assert sorted(ids[0].tolist()) == [0, 2]
    expected = {0: probs[0] / (probs[0] + probs[2]), 2: probs[2] / (probs[0] + probs[2])}
    for expert, weight in zip(ids[0].tolist(), weights[0].tolist()):
        assert abs(weight - float(expected[expert])) < 1e-6


def test_apply_is_idempotent_and_fixes_the_probe():
    assert patch_cpu_router.apply() is True
    owner, name = compat.cpu_routing_target()
    patched = getattr(owner, name)
    assert patch_cpu_router.apply() is True
    assert getattr(owner, name) is patched
    _, ids = route(torch.tensor([[1.0, 0.0]]), 1, bias=torch.tensor([0.0, 10.0]))
    assert ids.item() == 1


def test_routing_without_bias_is_unchanged():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for got, want in zip(route(logits, 3), route(logits, 3, original=True)):
        assert torch.equal(got, want)
