"""Patch: vLLM's safetensors iterator maps every tensor of the checkpoint, the routed experts the
repack cache serves included; mapping one reads the disk's read-ahead around it.

- Target: ``vllm.model_executor.model_loader.weight_utils.should_skip_weight`` (vLLM 0.27.1,
  0.32.0): the name filter ``safetensors_weights_iterator`` asks before ``get_tensor``. vLLM uses
  it to skip the experts of other expert-parallel ranks.
- Why: on a warm start the repack cache (``vllm_ernie_moe/quant/repack_cache.py``) serves the
  routed experts, most of a checkpoint's bytes, and the model does not load them. But safetensors'
  ``get_tensor`` touches the first page of the tensor it returns, and the kernel reads its
  read-ahead around that page (8 MiB on this project's disks): iterating the 28-layer 21B-A3B
  W4A16 checkpoint without using a tensor read 11.34 of its 12.30 GiB in 9.9 s; with the routed
  experts skipped, its other 1.62 GiB read 2.92 GiB in 2.5 s
  (docs/results/lazy-checkpoint-read-zen4.json).
- How: also skip the names :func:`vllm_ernie_moe.quant.repack_cache.is_not_read` gives, which is
  only while this plugin's model loads a checkpoint whose entries exist
  (``repack_cache.not_reading``); vLLM's own rule is asked as before. Where the iterator reads
  whole files (``--safetensors-load-strategy eager``, prefetch on network file systems) nothing
  is saved, and nothing changes. Where the hook is absent, the model drops the same tensors
  unread after the iterator mapped them (``CheckpointValidator``'s ``not_loaded``).
- Decided by the target's source: applied while the iterator asks ``should_skip_weight`` before
  ``get_tensor``.
- Upstream: no issue found. The upstream form would be a model hook naming the tensors it does
  not need, beside vLLM's expert-parallel filter.
- Remove when: vLLM lets a model skip checkpoint tensors before they are mapped.
- Test: ``tests/test_patch_should_skip_weight.py``; end to end
  ``tests/test_repack_cache.py::test_a_warm_start_is_served_without_the_experts_and_a_rewrite_repacks``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches.patching import install
from vllm_ernie_moe.quant import repack_cache

#: Characters between the name filter and ``get_tensor`` in the iterator's lazy path.
_FILTER_REACH = 200


def skips_served_tensors(should_skip: Callable[..., bool]) -> Callable[..., bool]:
    """``should_skip_weight`` that also skips the tensors the repack cache serves."""

    @functools.wraps(should_skip)
    def should_skip_weight(weight_name: str, *args, **kwargs) -> bool:
        return repack_cache.is_not_read(weight_name) or should_skip(weight_name, *args, **kwargs)

    return should_skip_weight


def _asked_before_mapping(_should_skip: Callable[..., bool]) -> bool:
    """The iterator's lazy path (its last ``f.get_tensor``) asks the filter just before."""
    weight_utils = compat.safetensors_name_filter_module()
    source = inspect.getsource(weight_utils.safetensors_weights_iterator)
    mapping = source.rindex("f.get_tensor(")
    return "should_skip_weight(" in source[max(0, mapping - _FILTER_REACH) : mapping]


def apply() -> bool:
    """Let vLLM's safetensors iterator skip what the repack cache serves; idempotent. True when
    active."""
    weight_utils = compat.safetensors_name_filter_module()
    if weight_utils is None:
        return False  # the model drops those tensors after they are mapped
    return install(
        __name__, weight_utils, "should_skip_weight", skips_served_tensors,
        bug_present=_asked_before_mapping,
        fixed="the routed experts the repack cache serves are not mapped",
    )  # fmt: skip
