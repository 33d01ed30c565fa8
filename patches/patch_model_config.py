"""Patch: vLLM picks no quantization method for msModelSlim checkpoints of ERNIE-4.5 MoE.

- Target: ``vllm.config.ModelConfig._verify_quantization``.
- Why: vLLM detects a quantization method only from ``quantization_config`` in config.json (or
  ``hf_quant_config.json``); msModelSlim removes that key and writes
  ``quant_model_description.json`` instead. Without a flag, vLLM would load int8 weights into a
  BF16 model. On NPUs, vllm-ascend's platform detects the file and picks ``ascend``; a general
  plugin has no such hook, hence this patch.
- How: when no method was asked for, the config has no ``quantization_config``, the architecture is
  ERNIE-4.5 MoE and a description JSON is in the model directory: on CPU (and CUDA) set
  ``quantization = "ernie-w8a8-dynamic"`` before the original method runs; on an NPU, where
  vllm-ascend detects only ``quant_model_description.json``, refuse a checkpoint that has only the
  v0 name ``quant_model_description_w8a8_dynamic.json`` and say to rename it (vllm-ascend would
  load its int8 weights as BF16). An explicit ``--quantization`` always wins.
- Upstream: no generic "detect by file" hook for plugins in vLLM 0.27-0.33.
- Decided by behaviour: the patch wraps ``_verify_quantization`` only while its code is the code
  the tests ran against (:data:`TESTED_TARGET`, a fingerprint of its AST: the same in vLLM 0.27.1,
  0.32.0 and 0.33.0, checked against 0.33's source by ``tests/test_vllm_api.py``). A changed
  target is left alone with one warning.
- Remove when: vLLM lets a quantization plugin claim a checkpoint by its files.
- Test: ``tests/test_patch_model_config.py``.
"""

from pathlib import Path

from vllm.logger import init_logger

from vllm_ernie_moe import ARCHITECTURE, compat
from vllm_ernie_moe.w8a8 import QUANTIZATION_NAME, QuantizationFormatError, find_description

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

#: ``compat.fingerprint_of(ModelConfig._verify_quantization)`` in vLLM 0.27.1, 0.32.0 and 0.33.0.
TESTED_TARGET = "b074835ceab0c2a6"
NPU_DESCRIPTION = "quant_model_description.json"  # the only name vllm-ascend detects


def unflagged_description(model_config) -> Path | None:
    """The description JSON of an ERNIE-4.5 MoE msModelSlim checkpoint with no method asked for."""
    if (
        model_config.quantization is None
        and model_config.model_arch_config.quantization_config is None
        and ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or [])
    ):
        return find_description(model_config.model)
    return None


def claims(model_config) -> bool:
    """Is this an ERNIE-4.5 MoE msModelSlim checkpoint for ``ernie-w8a8-dynamic`` (not an NPU)?"""
    from vllm.platforms import current_platform

    return current_platform.device_type != "npu" and unflagged_description(model_config) is not None


def check_npu_description(model_config) -> None:
    """On an NPU, refuse a description vllm-ascend does not detect (it would load int8 as BF16)."""
    description = unflagged_description(model_config)
    if description is not None and description.name != NPU_DESCRIPTION:
        raise QuantizationFormatError(
            f"{description}: vllm-ascend detects msModelSlim checkpoints only by "
            f"'{NPU_DESCRIPTION}': rename the file to {NPU_DESCRIPTION} (same content)."
        )


def apply() -> bool:
    """Wrap ``ModelConfig._verify_quantization``; idempotent. True when active."""
    from vllm.config import ModelConfig
    from vllm.platforms import current_platform

    original = ModelConfig._verify_quantization
    if getattr(original, "_vllm_ernie_moe_patch", False):
        return True
    if compat.fingerprint_of(original) != TESTED_TARGET:
        logger.warning(
            "vLLM %s changed ModelConfig._verify_quantization: patch_model_config not applied; "
            "serve msModelSlim checkpoints with --quantization %s.",
            compat.vllm_version(),
            "ascend" if current_platform.device_type == "npu" else QUANTIZATION_NAME,
        )
        return False

    def _verify_quantization(self) -> None:
        if current_platform.device_type == "npu":
            check_npu_description(self)
        elif claims(self):
            logger.info("msModelSlim checkpoint detected: quantization=%s.", QUANTIZATION_NAME)
            self.quantization = QUANTIZATION_NAME
        original(self)

    _verify_quantization._vllm_ernie_moe_patch = True  # type: ignore[attr-defined]
    _verify_quantization.__wrapped__ = original  # type: ignore[attr-defined]
    ModelConfig._verify_quantization = _verify_quantization
    return True
