"""vLLM plugin serving Baidu's ERNIE-4.5 MoE models (21B-A3B, 300B-A47B) correctly on every backend.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it starts.
"""

import functools
import hashlib
import importlib.util
from pathlib import Path

ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
MODEL_CLASS = "vllm_ernie_moe.model:Ernie4_5_MoeForCausalLM"
#: vLLM's name for ERNIE's MTP drafter (speculative method ``ernie_mtp`` / ``mtp``).
MTP_ARCHITECTURE = "ErnieMTPModel"
MTP_CLASS = "vllm_ernie_moe.mtp:ErnieMTP"

_registered = False


@functools.cache
def source_digest() -> str:
    """SHA-256 of the plugin's Python source, patches included: what a saved compilation and a
    stored repack depend on besides their inputs (the loading code decides the shard a repack
    gets). The patches install from their own folder (``package_dir`` in setup.py)."""
    patches = importlib.util.find_spec("vllm_ernie_moe.patches")
    assert patches is not None and patches.origin is not None
    roots = (Path(__file__).parent, Path(patches.origin).parent)
    digest = hashlib.sha256()
    for source in sorted({path for root in roots for path in root.rglob("*.py")}):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def register() -> None:
    """Register the model class in place of vLLM's built-in one, its config hooks, the
    chat-template fallback and the W8A8 method, and apply the runtime patches.

    Cheap and idempotent: the model module is imported lazily by vLLM, never here. Refuses a
    vLLM older than ``compat.SUPPORTED_VLLM`` (one line naming the range and the fix).
    """
    global _registered
    if _registered:
        return
    from vllm_ernie_moe import compat, cpu_tier, envs

    version = compat.check_supported_vllm()  # first: nothing below may fail on an old vLLM
    cpu_tier.force()  # before anything loads vLLM's kernel library (VLLM_ERNIE_MOE_CPU_TIER)
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    from vllm_ernie_moe.chat import register_chat_template
    from vllm_ernie_moe.config_hooks import register_config_hooks
    from vllm_ernie_moe.patches import apply_all

    # Named under "vllm." so that vLLM's log handler shows it.
    logger = init_logger(f"vllm.{__name__}")
    if version not in compat.TESTED_VLLM:
        logger.warning(
            "vllm-ernie-moe: vLLM %s is newer than the versions it was tested on (%s); the "
            "router patches decide by probing, but report problems.",
            version,
            compat.TESTED_VLLM,
        )
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if not envs.vllm_mtp_drafter():
        ModelRegistry.register_model(MTP_ARCHITECTURE, MTP_CLASS)
    register_config_hooks()
    logger.info(
        "vllm-ernie-moe: %s now served by %s, its MTP drafter by %s (replace vLLM's classes).",
        ARCHITECTURE,
        MODEL_CLASS,
        MTP_CLASS,
    )
    apply_all()
    register_chat_template()
    if current_platform.device_type != "npu":  # there, vllm-ascend serves msModelSlim checkpoints
        import vllm_ernie_moe.quant.config  # noqa: F401  (registers "ernie-w8a8-dynamic")
    _registered = True
