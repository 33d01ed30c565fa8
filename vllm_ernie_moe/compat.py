"""Every difference between the vLLM versions this plugin supports, decided in one place.

Supported: vLLM 0.27.1 (what vllm-ascend's main branch pairs with) through 0.33 (the newest). Code
elsewhere asks this module about a *feature* (does vLLM have a CPU router class, do its CPU experts
route by themselves), not about a version number. Version rules: :data:`SUPPORTED_VLLM`, checked
by ``register()``, and :data:`SGL_KERNELS_MEASURED_ON`, the range of
``patches/patch_cpu_sgl_kernels.py`` (a kernel choice, valid only where it was measured and tested).

- vLLM 0.23 (vllm-ascend's registry release 0.23.0.post1) has no ``FusedMoEFactory`` and no
  ``WeightsMapper.orig_to_new_stacked`` and its CPU wheel needs a torch this project cannot install:
  refused with one line that names the range and the vllm-ascend that fits.
- CPU MoE routing: vLLM 0.32+ routes in ``fused_moe/router/cpu_router.py`` (``CPURouter``) before
  modular experts; 0.27 routes inside each monolithic CPU expert kernel through
  ``fused_moe/cpu_fused_moe.py:select_experts``. Both drop ERNIE's correction bias
  (``patches/patch_cpu_router.py``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import SimpleNamespace

from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: The vLLM releases the test suite ran on (0.27.1 and 0.32.0 wheels) or whose source it checked
#: (0.33.0); newer releases load with a warning, older ones are refused.
SUPPORTED_VLLM = SpecifierSet(">=0.27.1")
TESTED_VLLM = SpecifierSet(">=0.27.1,<0.34")
#: For an older vLLM: what to install instead.
UPGRADE_HINT = (
    "vllm-ernie-moe supports vLLM 0.27.1 to 0.33. On Ascend use vllm-ascend's main branch "
    "(it pairs with vLLM 0.27.1); the registry release vllm-ascend 0.23.0.post1 pairs with "
    "vLLM 0.23 and is not supported. Install vLLM >= 0.27.1 with its matching vllm-ascend, or "
    "uninstall vllm-ernie-moe to use vLLM's built-in ERNIE class."
)

#: Where patches/patch_cpu_sgl_kernels.py's kernel choice was measured and tested (0.27 has other
#: targets; 0.33 the same ones but no CPU wheel to measure on).
SGL_KERNELS_MEASURED_ON = SpecifierSet(">=0.32,<0.33")

CPU_ROUTER_MODULE = "vllm.model_executor.layers.fused_moe.router.cpu_router"
CPU_SELECT_EXPERTS_MODULE = "vllm.model_executor.layers.fused_moe.cpu_fused_moe"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is older than this plugin supports."""


def vllm_version() -> Version:
    import vllm

    return Version(vllm.__version__)


def check_supported_vllm() -> Version:
    """Raise :class:`UnsupportedVLLMError` for a vLLM older than :data:`SUPPORTED_VLLM`."""
    version = vllm_version()
    if version not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(f"vLLM {version} is too old. {UPGRADE_HINT}")
    return version


def has_module(name: str) -> bool:
    """Whether vLLM has module ``name`` (without importing it when it does not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@functools.cache
def cpu_router_class() -> type | None:
    """vLLM 0.32+'s ``CPURouter``, or None where CPU experts route themselves (0.27)."""
    if not has_module(CPU_ROUTER_MODULE):
        return None
    return importlib.import_module(CPU_ROUTER_MODULE).CPURouter


@functools.cache
def cpu_experts_route_themselves() -> bool:
    """vLLM 0.27's CPU experts are monolithic: they take router logits and route inside."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsMonolithic

    return issubclass(CPUExpertsInt8, FusedMoEExpertsMonolithic)


def cpu_routing_target() -> tuple[object, str] | None:
    """Where vLLM's CPU backend routes MoE tokens, as (owner, function name): 0.32+'s
    ``CPURouter._compute_routing``, 0.27's ``cpu_fused_moe.select_experts``; None if neither."""
    router_cls = cpu_router_class()
    if router_cls is not None:
        return router_cls, "_compute_routing"
    if has_module(CPU_SELECT_EXPERTS_MODULE):
        return importlib.import_module(CPU_SELECT_EXPERTS_MODULE), "select_experts"
    return None


def sgl_kernel_choice_measured() -> bool:
    """Whether this vLLM is one :data:`SGL_KERNELS_MEASURED_ON`."""
    return vllm_version() in SGL_KERNELS_MEASURED_ON


def cpu_int8_linear_takes_sgl(rows: int, inputs: int) -> bool:
    """Whether vLLM's CPU int8 linear kernel runs an int8 ``[rows, inputs]`` weight on sgl-kernel's
    GEMM (packed by ``convert_weight_packed``) rather than oneDNN's: the CPU platform on x86 (an
    AMX host serving CUDA is not), its shape rule (as ``patch_cpu_sgl_kernels`` applies it) and,
    where vLLM still has it (0.27), its opt-in ``VLLM_CPU_SGL_KERNEL``."""
    import torch
    from vllm import envs as vllm_envs
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as cpu_scaled_mm
    from vllm.platforms import CpuArchEnum, current_platform

    return (
        current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and getattr(vllm_envs, "VLLM_CPU_SGL_KERNEL", True)
        and cpu_scaled_mm.check_cpu_sgl_kernel(rows, inputs, torch.int8)
    )


WEIGHT_UTILS_MODULE = "vllm.model_executor.model_loader.weight_utils"


def safetensors_name_filter_module():
    """vLLM's ``weight_utils`` where its safetensors iterator asks ``should_skip_weight`` (its
    expert-parallel filter, 0.27.1 to 0.33) before mapping a tensor; None where it has no such
    filter."""
    weight_utils = importlib.import_module(WEIGHT_UTILS_MODULE)
    return weight_utils if hasattr(weight_utils, "should_skip_weight") else None


CPU_ATTENTION_MODULE = "vllm.v1.attention.backends.cpu_attn"


def cpu_attention_refusal(vllm_config) -> str | None:
    """What vLLM's CPU attention would refuse about this config once its workers build the KV
    cache (e.g. "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."), asked of its own rule
    (``_get_attn_isa``, 0.27 to 0.33) before any engine starts; None when it accepts it."""
    choose_isa = getattr(importlib.import_module(CPU_ATTENTION_MODULE), "_get_attn_isa", None)
    if choose_isa is None:
        return None
    model, cache = vllm_config.model_config, vllm_config.cache_config
    try:
        choose_isa(model.dtype, cache.block_size or 32, model.get_head_size(), cache.cache_dtype)
    except NotImplementedError as error:
        return str(error)
    return None


def cpu_communicator_gathers_uneven_shards() -> bool:
    """Whether vLLM's CPU communicator implements ``all_gatherv``, which MoE layers under data
    parallelism dispatch through (0.27.1 to 0.33: not implemented, the first request fails)."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    return "all_gatherv" in CpuCommunicator.__dict__


def cpu_worker_warms_up(vllm_config) -> bool:
    """Whether vLLM's CPU worker calls ``warming_up_model`` under this config, asked of its own
    rule where it has one (0.32, 0.33: ``_should_warm_up_model`` skips it when eager with an
    explicit KV cache size, or under ``VLLM_CPU_CI_ENV``); 0.27 always calls it."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    should_warm_up = getattr(CPUWorker, "_should_warm_up_model", None)
    if should_warm_up is None:
        return True
    settings = SimpleNamespace(
        compilation_config=vllm_config.compilation_config, cache_config=vllm_config.cache_config
    )
    return should_warm_up(settings)
