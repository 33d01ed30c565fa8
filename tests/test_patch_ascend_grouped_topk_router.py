"""patch_ascend_grouped_topk_router: vllm-ascend's own router (the contract probe runs it on CPU
as a 310P, where every ERNIE MoE layer takes this path) weights wrongly before the patch and by
ERNIE's rule after it, against hand-computed weights."""

import math
import sys

import pytest
from ascend_contract_probe import ROUTING_BIAS, ROUTING_LOGITS


def _ernie_weights() -> dict[int, float]:
    """Hand-computed ERNIE routing of the probe token (float64): ids -> weights."""
    logits = ROUTING_LOGITS[0]
    exps = [math.exp(x) for x in logits]
    p = [e / sum(exps) for e in exps]
    chosen = sorted(range(len(p)), key=lambda e: -(p[e] + ROUTING_BIAS[e]))[:2]
    return {e: p[e] / sum(p[c] for c in chosen) for e in chosen}


def test_310p_router_weights_are_fixed_by_the_patch(contract):
    if contract["device"] != "_310P":
        pytest.skip("A2/A3 route through the fused kernel")
    routing = contract["routing"]
    assert routing["router_class"] == "AscendGroupedTopKRouter310"
    expected = _ernie_weights()
    for result, correct in (("unpatched", False), ("patched", True)):
        got = dict(zip(routing[result]["ids"][0], routing[result]["weights"][0]))
        assert got.keys() == expected.keys()
        matches = all(abs(got[e] - w) < 1e-5 for e, w in expected.items())
        assert matches == correct, f"{result}: {got} vs ERNIE {expected}"


def test_patched_ascend_router_is_only_applied_on_npu():
    from vllm_ernie_moe.patches import patch_ascend_grouped_topk_router

    assert patch_ascend_grouped_topk_router.apply() is False
    assert "vllm_ascend" not in sys.modules
