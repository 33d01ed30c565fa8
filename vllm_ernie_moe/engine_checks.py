"""Engine settings the model cannot serve on the running backend, refused while vLLM builds its
config (in the calling process, before any engine starts), one line each with the fix.

Registered in vLLM's per-architecture config hook table (``MODELS_CONFIG_MAP``, the extension point
vLLM's own models use) by ``register()``.
"""

from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig


class ErnieMoeEngineChecks(VerifyAndUpdateConfig):
    """vLLM's CPU backend with expert or pipeline parallelism: refused (crashes upstream)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        parallel = vllm_config.parallel_config
        if parallel.enable_expert_parallel:
            raise ValueError(
                "--enable-expert-parallel is not supported on vLLM's CPU backend: its fused MoE "
                "kernel (csrc/cpu/cpu_fused_moe.cpp) segfaults with an expert map, for vLLM's "
                "built-in ERNIE class too. Drop the flag: --tensor-parallel-size shards the "
                "experts across ranks instead (and EPLB, which needs expert parallelism, runs on "
                "GPU/NPU only)."
            )
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(
                f"--pipeline-parallel-size {parallel.pipeline_parallel_size} is not supported on "
                "vLLM's CPU backend: its model runner fails on the first step "
                "(sync_and_gather_intermediate_tensors), for vLLM's built-in ERNIE class too. "
                "Use --tensor-parallel-size on CPU; pipeline parallelism is for GPU/NPU."
            )


def register_engine_checks(architecture: str) -> None:
    """Add the checks to vLLM's table for ``architecture``; idempotent."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[architecture] = ErnieMoeEngineChecks
