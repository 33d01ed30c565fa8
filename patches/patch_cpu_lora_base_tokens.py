"""Patch: vLLM's CPU LoRA ops apply the last adapter to base-model tokens of a mixed batch.

- Targets: ``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice`` of
  ``vllm.lora.ops.torch_ops.lora_ops`` (its ``sgmv_*`` prefill ops call them), and the names
  ``vllm.lora.ops.torch_ops`` and ``vllm.lora.punica_wrapper.punica_cpu`` imported from it.
- Why: a token without an adapter has LoRA index -1. The Triton kernels skip it; the PyTorch ops
  that vLLM's CPU backend uses gather ``weights[-1]``, the last adapter slot. In a batch that mixes
  adapter and base-model requests, the base requests silently get an adapter's delta (measured on
  vLLM 0.32: base prompts batched with two adapters gave the second adapter's tokens).
- How: the op runs with the index clamped to 0 and the rows of index -1 tokens get their previous
  values back, i.e. the op does not touch them, as the Triton kernels do.
- Decided by behaviour: a probe shrinks one index -1 token; the patch applies exactly when the
  result is not zero. vLLM 0.33 has the fix (vllm-project/vllm PR #48421), so the probe keeps the
  patch off there; 0.27.1 and 0.32.0 need it.
- Remove when: the supported range starts at a vLLM with the fix (0.33).
- Test: ``tests/test_patch_cpu_lora_base_tokens.py``; end to end ``tests/test_lora.py``.
"""

from __future__ import annotations

import functools
import importlib

import torch

from vllm_ernie_moe.patches.patching import install

OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
#: Modules holding their own reference to the ops.
IMPORTERS = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _applies_last_adapter_to_base_tokens(bgmv_shrink) -> bool:
    """Shrink one token with index -1 through one adapter slot of ones: the result must be 0."""
    output = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 2), torch.ones(1, 1, 1, 2), output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def skipping_base_tokens(op):
    """``op`` (a bgmv op) that leaves the output rows of index -1 tokens untouched."""

    @functools.wraps(op)
    def wrapped(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs) -> None:
        base = lora_indices_tensor < 0
        if not base.any():
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if base.all():
            return
        rows = output_tensor[: base.shape[0]]
        kept = rows[base].clone()
        op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        rows[base] = kept

    return wrapped


def apply() -> bool:
    """Patch the CPU LoRA ops on the CPU platform if the probe sees the bug; idempotent.
    True when active."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    ops = importlib.import_module(OPS_MODULE)
    probe = {"bug_present": _applies_last_adapter_to_base_tokens}  # probed on the first op only
    for name in OPS:
        if not install(
            __name__, ops, name, skipping_base_tokens, importers=IMPORTERS,
            fixed="base-model tokens skipped", **probe,
        ):  # fmt: skip
            return False
        probe = {}
    return True
