"""Patch: vLLM reads a missing ERNIE MTP head as ``None`` layers and fails with a pydantic error.

- Target: ``ErnieMTPModelArchConfigConvertor.get_num_hidden_layers`` in
  ``vllm.transformers_utils.model_arch_config_convertor`` (vLLM 0.27 to 0.33).
- Why: the drafter's layer count is ``getattr(config, "num_nextn_predict_layers", 0)``. Newer
  transformers (5.25 here, which vLLM 0.27.1 allows; 0.32.0 pins ``<5.20``, 0.33.0 ``<5.21``)
  declare the MTP layer count on ``Ernie4_5_MoeConfig`` (``num_mtp_layers``, with
  ``num_nextn_predict_layers`` as its alias) with the default ``None``, and a config.json may say
  ``null``. Asking for
  MTP on a checkpoint without the head then dies inside ``SpeculativeConfig`` with
  "total_num_hidden_layers: Input should be a valid integer", before the plugin's config hook can
  say what is wrong and how to fix it (``vllm_ernie_moe.mtp.mtp_layer_count``).
- How: ``None`` counts as 0 layers, what the getattr default already says; vLLM then builds the
  config and the plugin's hook refuses it with the fix.
- Decided by behaviour: a probe asks the convertor for the layer count of a config whose field is
  ``None``; the patch applies exactly when the answer is not an int.
- Upstream: present in vLLM 0.27.1, 0.32.0 and 0.33.0 (same line); the fix is
  ``getattr(self.hf_text_config, "num_nextn_predict_layers", None) or 0``. No upstream issue found.
- Remove when: the probe reports an int on every supported vLLM (the plugin logs "not needed").
- Test: ``tests/test_patch_ernie_mtp_layer_count.py``; end to end ``tests/test_mtp.py``.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

from vllm_ernie_moe.patches.patching import install, logger

CONVERTOR_MODULE = "vllm.transformers_utils.model_arch_config_convertor"
CONVERTOR = "ErnieMTPModelArchConfigConvertor"


def _layer_count_of_a_headless_config(get_num_hidden_layers) -> object:
    headless = SimpleNamespace(num_nextn_predict_layers=None)
    return get_num_hidden_layers(SimpleNamespace(hf_text_config=headless))


def zero_when_undeclared(get_num_hidden_layers):
    """``get_num_hidden_layers`` that answers 0 where the checkpoint declares no MTP layer."""

    @functools.wraps(get_num_hidden_layers)
    def wrapped(self) -> int:
        return get_num_hidden_layers(self) or 0

    return wrapped


def _counts_none(get_num_hidden_layers) -> bool:
    return not isinstance(_layer_count_of_a_headless_config(get_num_hidden_layers), int)


def apply() -> bool:
    """Patch the convertor if the probe sees the bug; idempotent. True when active."""
    importlib.import_module("vllm.config")  # imported first, else the convertor's import cycles
    convertor = getattr(importlib.import_module(CONVERTOR_MODULE), CONVERTOR, None)
    if convertor is None:
        logger.info("vLLM has no %s: patch_ernie_mtp_layer_count not applied.", CONVERTOR)
        return False
    return install(
        __name__, convertor, "get_num_hidden_layers", zero_when_undeclared,
        bug_present=_counts_none, fixed="an undeclared MTP head counts as 0 layers",
    )  # fmt: skip
