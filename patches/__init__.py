"""Runtime patches to vLLM / vllm-ascend. This top-level folder installs as
``vllm_ernie_moe.patches`` (``package_dir`` in setup.py). ``vllm_ernie_moe.register`` runs
:func:`apply_all` in every process vLLM loads plugins in (the API server / engine-start process
and each worker), before any model is built: every patch applies before the engine starts and in
each worker; one whose target module the API server never imports applies when a process imports
it (``patching.when_imported``).

One module per upstream target, named ``patch_<target>.py``; each documents its target, why, the
upstream status, what decides that it applies (a probe of the bug where one is possible, else the
vLLM versions its tests ran on) and when to remove it, and has its own
``tests/test_patch_<target>.py``. All of them probe, wrap, mark and log through
``patching.install``; the runtime reads one function of one of them
(``patch_cpu_warmup_size.warmup_collectives``, which the ranks compare). Upstream-ready fixes:
``docs/upstream/``.
"""

from vllm_ernie_moe.patches import (
    patch_ascend_grouped_topk_router,
    patch_cpu_aot_compile_cache,
    patch_cpu_engine_core_worker,
    patch_cpu_lora_base_tokens,
    patch_cpu_multinode_queues,
    patch_cpu_onednn_handler_release,
    patch_cpu_router,
    patch_cpu_sgl_kernels,
    patch_cpu_unquantized_gemm,
    patch_cpu_warmup_size,
    patch_ernie_mtp_layer_count,
    patch_should_skip_weight,
)


def apply_all() -> None:
    """Apply every patch that the running platform and vLLM version need. Idempotent."""
    patch_ascend_grouped_topk_router.apply()
    patch_cpu_aot_compile_cache.apply()
    patch_cpu_engine_core_worker.apply()
    patch_cpu_lora_base_tokens.apply()
    patch_cpu_multinode_queues.apply()
    patch_cpu_onednn_handler_release.apply()
    patch_cpu_router.apply()
    patch_cpu_sgl_kernels.apply()
    patch_cpu_unquantized_gemm.apply()
    patch_cpu_warmup_size.apply()
    patch_ernie_mtp_layer_count.apply()
    patch_should_skip_weight.apply()
