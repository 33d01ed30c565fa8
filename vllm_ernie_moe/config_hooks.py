"""vLLM's per-architecture config hooks for ERNIE-4.5 MoE, run while vLLM builds its config in the
calling process, before any engine starts.

``register()`` puts :class:`ErnieMoeConfigHooks` in ``MODELS_CONFIG_MAP``, the table vLLM's own
models use (vLLM 0.27 to 0.33: ``ModelConfig.__post_init__`` calls
``verify_and_update_model_config`` right before ``_verify_quantization``, and ``VllmConfig`` calls
``verify_and_update_config``). No vLLM function is patched.

- msModelSlim detection: vLLM picks a quantization method only from ``quantization_config`` in
  config.json; msModelSlim removes that key and writes ``quant_model_description.json``. Without a
  flag, an int8 checkpoint would load as BF16. On CPU (and CUDA) the hook picks
  ``ernie-w8a8-dynamic``; on an NPU vllm-ascend's platform picks ``ascend`` later, but detects only
  ``quant_model_description.json``: a checkpoint with only msModelSlim v0's name is refused with the
  fix. An explicit ``--quantization`` always wins.
- Parallel modes vLLM's CPU backend cannot run for MoE models (expert, pipeline and data parallel,
  the Ray executor) are refused.
- MTP speculative decoding on a checkpoint without an MTP head (``num_nextn_predict_layers``) is
  refused here, in the calling process, with the fix.
- A KV cache dtype vLLM's CPU attention cannot run on this CPU (fp8 without AVX-512 or AMX) is
  refused with the fix, by asking vLLM's own rule, instead of failing in the workers.
- Multi-node (``--nnodes`` above 1): the ranks wait for each other with a bound
  (``envs.node_timeout_seconds``) unless ``--distributed-timeout-seconds`` is given, and node 0 says
  where it waits and what a timeout means.
- Start-up on CPU: what the last start of the checkpoint read (its repack cache entries, the
  tensors they do not replace) is read ahead from here, while the engine processes start
  (``repack_cache.read_ahead_noted``).
- LoRA on CPU: vLLM's CPU LoRA kernels have no MoE path, so adapters apply to attention, dense
  MLPs and shared experts (the default target list); a target list naming the routed experts or
  the router is refused.
"""

from __future__ import annotations

from pathlib import Path

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_ernie_moe import ARCHITECTURE, compat, envs
from vllm_ernie_moe.layout import CPU_LORA_MODULES
from vllm_ernie_moe.quant.msmodelslim import (
    DESCRIPTION_FILE,
    QUANTIZATION_NAME,
    QuantizationFormatError,
    find_description,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

#: Modules of the MoE blocks vLLM's CPU backend cannot adapt: routed experts and router.
CPU_LORA_REFUSED = ("experts", "gate")


def unflagged_description(model_config) -> Path | None:
    """The description JSON of an ERNIE-4.5 MoE msModelSlim checkpoint with no method asked for."""
    if (
        model_config.quantization is None
        and model_config.model_arch_config.quantization_config is None
        and ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or [])
    ):
        return find_description(model_config.model)
    return None


class ErnieMoeConfigHooks(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Pick ``ernie-w8a8-dynamic`` for msModelSlim checkpoints (CPU, CUDA); on an NPU refuse a
        description name vllm-ascend does not detect (it would load the int8 weights as BF16)."""
        from vllm.platforms import current_platform

        description = unflagged_description(model_config)
        if description is None:
            return
        if current_platform.device_type != "npu":
            logger.info("msModelSlim checkpoint detected: quantization=%s.", QUANTIZATION_NAME)
            model_config.quantization = QUANTIZATION_NAME
        elif description.name != DESCRIPTION_FILE:
            raise QuantizationFormatError(
                f"{description}: vllm-ascend detects msModelSlim checkpoints only by "
                f"'{DESCRIPTION_FILE}': rename the file to {DESCRIPTION_FILE} (same content)."
            )

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """MTP needs the head; vLLM's CPU backend: refuse expert or pipeline parallelism (they
        crash upstream) and the Ray executor (no CPU support), keep LoRA off the routed experts."""
        from vllm.platforms import current_platform

        speculative = vllm_config.speculative_config
        if speculative is not None and speculative.method == "mtp":
            from vllm_ernie_moe.mtp import mtp_layer_count

            model_config = vllm_config.model_config
            mtp_layer_count(model_config.hf_config, model_config.model)
        bound_waits_between_nodes(vllm_config.parallel_config)
        if not current_platform.is_cpu():
            return
        if vllm_config.lora_config is not None:
            restrict_lora_to_dense_modules(vllm_config.lora_config)
        refuse_kv_cache_the_cpu_cannot_run(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.enable_expert_parallel:
            raise ValueError(
                "--enable-expert-parallel is not supported on vLLM's CPU backend: its fused MoE "
                "kernel (csrc/cpu/cpu_fused_moe.cpp) segfaults with an expert map, for vLLM's "
                "built-in ERNIE class too. Drop the flag: --tensor-parallel-size shards the "
                "experts across ranks instead (and EPLB, which needs expert parallelism, runs on "
                "GPU/NPU only)."
            )
        if parallel.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
            raise ValueError(
                "--distributed-executor-backend ray is not supported on vLLM's CPU backend: its "
                "CPU platform declares no Ray device (the engine would fail with 'current "
                "platform cpu does not support ray'). Drop the flag: the default 'mp' backend runs "
                "--tensor-parallel-size on one machine; Ray multi-node is for GPU/NPU."
            )
        if parallel.data_parallel_size > 1 and not compat.cpu_communicator_gathers_uneven_shards():
            raise ValueError(
                f"--data-parallel-size {parallel.data_parallel_size} is not supported on vLLM's "
                "CPU backend for MoE models: the engine starts, then the first request fails in "
                "every data-parallel rank (its CPU communicator has no all_gatherv, which the MoE "
                "layers dispatch tokens through, in vLLM's FusedMoE whatever the model class). Use "
                "--tensor-parallel-size, across machines with --nnodes (examples/multinode.sh)."
            )
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(
                f"--pipeline-parallel-size {parallel.pipeline_parallel_size} is not supported on "
                "vLLM's CPU backend: its model runner fails on the first step "
                "(sync_and_gather_intermediate_tensors), for vLLM's built-in ERNIE class too. "
                "Use --tensor-parallel-size on CPU; pipeline parallelism is for GPU/NPU."
            )
        from vllm_ernie_moe.quant import repack_cache

        repack_cache.read_ahead_noted(
            vllm_config.model_config.model,
            parallel.tensor_parallel_size,
            parallel.pipeline_parallel_size,
        )


def bound_waits_between_nodes(parallel) -> None:
    """A node that never comes, or dies, leaves the others waiting in torch's rendezvous or in a
    collective, for torch's default (30 minutes for gloo) or longer: bound both waits when the
    user did not, and say on node 0 what a timeout there means."""
    if parallel.nnodes <= 1:
        return
    seconds = parallel.distributed_timeout_seconds
    if seconds is None:
        seconds = parallel.distributed_timeout_seconds = envs.node_timeout_seconds()
    if parallel.cpu_distributed_timeout_seconds is None:
        parallel.cpu_distributed_timeout_seconds = seconds
    if parallel.node_rank == 0:
        logger.info(
            "Node 0 of %d: waiting up to %d s for the other nodes' ranks at %s:%d (set "
            "--distributed-timeout-seconds or %s to change it). A start that ends in 'Timed out "
            "... clients joined' means a node did not start or cannot reach that address: start "
            "examples/multinode.sh on every node with the same model and arguments.",
            parallel.nnodes, seconds, parallel.master_addr, parallel.master_port,
            envs.NODE_TIMEOUT_VARIABLE,
        )  # fmt: skip


def refuse_kv_cache_the_cpu_cannot_run(vllm_config) -> None:
    """A quantized KV cache vLLM's CPU attention cannot run here (fp8 needs AVX-512 or AMX) fails
    in every worker after the weights loaded, inside a stack trace; refuse it before that."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype == "auto" or not cache_dtype:
        return
    refusal = compat.cpu_attention_refusal(vllm_config)
    if refusal:
        raise ValueError(
            f"--kv-cache-dtype {cache_dtype} cannot run on this CPU: vLLM's CPU attention says "
            f'"{refusal}" Serve with --kv-cache-dtype auto (the model dtype) on this CPU.'
        )


def restrict_lora_to_dense_modules(lora_config) -> None:
    """Default LoRA targets on CPU to ``layout.CPU_LORA_MODULES``; refuse routed experts, router."""
    if lora_config.target_modules is None:
        lora_config.target_modules = list(CPU_LORA_MODULES)
        return
    refused = sorted(m for m in lora_config.target_modules if m in CPU_LORA_REFUSED)
    if refused:
        raise ValueError(
            f"LoRA target modules {refused} are not supported on vLLM's CPU backend: its LoRA "
            "kernels have no MoE path (routed experts and their router). Target only "
            f"{CPU_LORA_MODULES} (attention, dense MLP, shared experts), or serve on GPU."
        )


def register_config_hooks() -> None:
    """Put the hooks in vLLM's table for the architecture; idempotent."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCHITECTURE] = ErnieMoeConfigHooks
