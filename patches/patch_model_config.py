"""Patch: vLLM picks no quantization method for msModelSlim checkpoints of ERNIE-4.5 MoE.

- Target: ``vllm.config.ModelConfig._verify_quantization``.
- Why: vLLM detects a quantization method only from ``quantization_config`` in config.json (or
  ``hf_quant_config.json``); msModelSlim removes that key and writes
  ``quant_model_description.json`` instead. Without a flag, vLLM would load int8 weights into a
  BF16 model. On NPUs, vllm-ascend's platform detects the file and picks ``ascend``; a general
  plugin has no such hook, hence this patch.
- How: when no method was asked for, the config has no ``quantization_config``, the architecture is
  ERNIE-4.5 MoE, the platform is not an NPU and a description JSON is in the model directory, set
  ``quantization = "ernie-w8a8-dynamic"`` before the original method runs. An explicit
  ``--quantization`` always wins.
- Upstream: no generic "detect by file" hook for plugins in vLLM 0.32.
- Applies to: vLLM ``>=0.32,<0.33`` (the method's name and the attributes it reads are checked).
- Remove when: vLLM lets a quantization plugin claim a checkpoint by its files.
- Test: ``tests/test_patch_model_config.py``.
"""

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from vllm.logger import init_logger

from vllm_ernie_moe import ARCHITECTURE
from vllm_ernie_moe.w8a8 import QUANTIZATION_NAME, find_description

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

APPLIES_TO = SpecifierSet(">=0.32,<0.33")


def claims(model_config) -> bool:
    """Is this an ERNIE-4.5 MoE msModelSlim checkpoint with no quantization asked for?"""
    from vllm.platforms import current_platform

    return (
        model_config.quantization is None
        and model_config.model_arch_config.quantization_config is None
        and ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or [])
        and current_platform.device_type != "npu"
        and find_description(model_config.model) is not None
    )


def apply() -> bool:
    """Wrap ``ModelConfig._verify_quantization``; idempotent. True when active."""
    import vllm
    from vllm.config import ModelConfig

    original = ModelConfig._verify_quantization
    if getattr(original, "_vllm_ernie_moe_patch", False):
        return True
    if Version(vllm.__version__) not in APPLIES_TO:
        logger.warning(
            "vLLM %s is outside %s: msModelSlim checkpoints need --quantization %s.",
            vllm.__version__,
            APPLIES_TO,
            QUANTIZATION_NAME,
        )
        return False

    def _verify_quantization(self) -> None:
        if claims(self):
            logger.info("msModelSlim checkpoint detected: quantization=%s.", QUANTIZATION_NAME)
            self.quantization = QUANTIZATION_NAME
        original(self)

    _verify_quantization._vllm_ernie_moe_patch = True  # type: ignore[attr-defined]
    _verify_quantization.__wrapped__ = original  # type: ignore[attr-defined]
    ModelConfig._verify_quantization = _verify_quantization
    return True
