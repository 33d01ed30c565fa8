"""patch_cpu_lora_base_tokens: tokens without an adapter (index -1) get no LoRA delta on CPU."""

import importlib

import pytest
import torch

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches import patch_cpu_lora_base_tokens as patch

ops = importlib.import_module(patch.OPS_MODULE)
#: Slot 0 and slot 1 (the last) of a rank-2 adapter stack, [slots, 1, out, in] as vLLM stacks them.
WEIGHTS = torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(0))
INPUTS = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
INDICES = torch.tensor([0, -1, 1])  # an adapter, the base model, the last adapter


def delta(row: int) -> torch.Tensor:
    """Hand-computed LoRA product of one token through its slot."""
    return WEIGHTS[INDICES[row], 0] @ INPUTS[row]


def test_unpatched_vllm_gives_base_tokens_the_last_adapter():
    """The bug the patch exists for, on the vLLM releases before the fix; when this fails on
    them, upstream fixed it there too: narrow the patch."""
    if compat.vllm_version().release >= (0, 33):
        pytest.skip("vLLM 0.33 skips index -1 tokens (PR #48421)")
    output = torch.zeros(3, 3)
    original = getattr(ops.bgmv_shrink, "__wrapped__", ops.bgmv_shrink)
    original(INPUTS, WEIGHTS, output, INDICES, 1.0)
    assert torch.allclose(output[1], WEIGHTS[1, 0] @ INPUTS[1])


def test_shrink_and_expand_leave_base_rows_untouched():
    assert patch.apply() is (compat.vllm_version().release < (0, 33))
    shrunk = torch.full((3, 3), 7.0)
    ops.bgmv_shrink(INPUTS, WEIGHTS, shrunk, INDICES, 2.0)
    added = torch.ones(3, 3)
    ops.bgmv_expand(INPUTS, WEIGHTS, added, INDICES, True)
    sliced = torch.ones(3, 5)
    ops.bgmv_expand_slice(INPUTS, WEIGHTS, sliced, INDICES, 1, 3, True)
    for row in (0, 2):
        assert torch.allclose(shrunk[row], 2.0 * delta(row), atol=1e-6)
        assert torch.allclose(added[row], 1 + delta(row), atol=1e-6)
        assert torch.allclose(sliced[row, 1:4], 1 + delta(row), atol=1e-6)
    assert torch.equal(shrunk[1], torch.full((3,), 7.0))
    assert torch.equal(added[1], torch.ones(3))
    assert torch.equal(sliced[1], torch.ones(5))


def test_prefill_ops_and_the_cpu_punica_wrapper_use_the_patched_ops():
    from vllm.lora.punica_wrapper import punica_cpu

    patch.apply()
    for name in patch.OPS:
        assert getattr(punica_cpu, name) is getattr(ops, name)
    # sgmv (prefill) expands each sequence's index over its tokens and calls the bgmv ops.
    output = torch.zeros(3, 3)
    ops.sgmv_shrink(
        INPUTS, WEIGHTS, output, None, torch.tensor([2, 1]), torch.tensor([-1, 1]), 2, 2, 3, 1.0
    )
    assert torch.equal(output[:2], torch.zeros(2, 3))
    assert torch.allclose(output[2], WEIGHTS[1, 0] @ INPUTS[2], atol=1e-6)


def test_apply_is_idempotent():
    first = patch.apply()
    shrink = ops.bgmv_shrink
    assert patch.apply() is first
    assert ops.bgmv_shrink is shrink
