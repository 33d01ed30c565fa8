"""Patch: vLLM uses its fast sgl-kernel CPU kernels only on CPUs with AMX.

- Targets:
  1. ``vllm.model_executor.layers.utils.check_cpu_sgl_kernel`` (and the name imported by
     ``vllm.model_executor.kernels.linear.scaled_mm.cpu``), which picks between vLLM's two CPU
     GEMM back ends for bf16 and W8A8 int8 linear layers: sgl-kernel's packed GEMMs
     (``weight_packed_linear``, ``int8_scaled_mm_with_quant``) or oneDNN;
  2. ``vllm.model_executor.layers.fused_moe.oracle.unquantized.backend_to_kernel_cls``, the list of
     bf16 MoE expert kernels for the CPU back end (vLLM's portable "vec" grouped GEMM when there is
     no AMX).
- Why: vLLM asks for AMX tiles before it uses the sgl kernels, but they also have AVX-512
  (BF16 / VNNI) code paths. On AVX-512 CPUs without AMX (this project's AMD EPYCs) they stream
  weights at batch 1 faster than oneDNN's GEMMs and vLLM's "vec" bf16 experts, and keep up at
  batch 8 to 1024 (bf16: see the input width limit below); batch-1 decode is bound by exactly that
  streaming rate. Measured by ``benchmarks/roofline.py [--by-shape]`` and the A/B runs of
  ``benchmarks/bench_engines.py``: docs/benchmarks.md ("sgl kernels") has the numbers.
- How: on x86 CPUs with AVX-512 BF16 and VNNI and without AMX only: (1) also accept bf16 and int8
  linear weights that meet the kernels' alignment (``k % 32 == 0 and n % 16 == 0``, upstream's own
  rule for int8), without upstream's bf16 size cap (it exists because oneDNN wins at large batch
  *with* AMX) but, for bf16, only for inputs up to ``SGL_BF16_MAX_K`` wide: with a wide input the
  sgl bf16 GEMM falls behind oneDNN once a batch has 8 or more rows (the dense down_proj,
  k = 12288; docs/benchmarks.md), while the k <= 3072 layers keep up; (2) put
  :class:`SglCPUUnquantizedExperts` (bf16, SiLU, no bias, hidden and intermediate sizes multiples
  of 32) first in the CPU expert list. Everything else keeps
  upstream's choice; fp16/fp32 are untouched. ``VLLM_ERNIE_MOE_SGL_KERNELS=0`` turns it off.
- Upstream: vLLM 0.32.0 gates both on ``torch.cpu._is_amx_tile_supported()``; no issue found.
- Applies to: vLLM ``>=0.32,<0.33``, where its tests ran; on another version it is not applied
  and says so once. vLLM 0.27 has other targets (monolithic CPU experts that route themselves, the
  sgl GEMMs behind ``VLLM_CPU_SGL_KERNEL``); vLLM 0.33 has the same targets but no CPU wheel to
  test on (``check_cpu_sgl_kernel`` is unchanged there, ``fused_experts_cpu`` gained a defaulted
  ``act_method``).
- Remove when: upstream selects these kernels on AVX-512 BF16/VNNI CPUs without AMX.
- Test: ``tests/test_patch_cpu_sgl_kernels.py`` (the choice, the kernels against plain PyTorch
  math); the model parity tests against transformers run through them on such CPUs.
"""

from __future__ import annotations

import functools

import torch

from vllm_ernie_moe import compat, envs
from vllm_ernie_moe.patches.patching import install, logger


def avx512_without_amx() -> bool:
    """x86 with AVX-512 BF16 and VNNI (the sgl kernels' non-AMX paths) but no AMX tiles."""
    from vllm.platforms import CpuArchEnum, current_platform

    return (
        current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and torch.cpu._is_avx512_bf16_supported()
        and torch.cpu._is_vnni_supported()
        and not torch.cpu._is_amx_tile_supported()
    )


#: The widest input for which the sgl bf16 GEMM kept up with oneDNN at every batch size.
SGL_BF16_MAX_K = 3072


def sgl_kernel_fits(n: int, k: int, dtype: torch.dtype) -> bool:
    """A [n, k] bf16 or int8 weight the sgl GEMMs take (layout) and run faster than oneDNN."""
    wins = dtype == torch.int8 or (dtype == torch.bfloat16 and k <= SGL_BF16_MAX_K)
    return wins and k % 32 == 0 and n % 16 == 0


@functools.cache
def _sgl_experts_class():
    """Defined on first use: importing vLLM's MoE experts module is not free."""
    from vllm._custom_ops import CPUQuantMethod, fused_experts_cpu
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8

    class SglCPUUnquantizedExperts(CPUExpertsInt8):
        """bf16 experts on sgl-kernel's ``fused_experts_cpu``: vLLM's int8 experts (VNNI-packed
        weights, fused SiLU-and-mul, weighted combine) with the kernel's unquantized path."""

        @staticmethod
        def _supports_current_device() -> bool:
            return avx512_without_amx()

        @staticmethod
        def is_supported_config(cls, moe_config, weight_key, activation_key, activation_format):
            if moe_config.in_dtype != torch.bfloat16:
                return False, "kernel requires bfloat16 activations"
            if moe_config.has_bias:
                return False, "kernel takes no expert bias"
            return CPUExpertsInt8.is_supported_config(
                cls, moe_config, weight_key, activation_key, activation_format
            )

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return (weight_key, activation_key) == (None, None)

        @staticmethod
        def _supports_activation(activation) -> bool:
            from vllm.model_executor.layers.fused_moe.activation import MoEActivation

            return activation == MoEActivation.SILU  # the kernel call below fuses SiLU-and-mul

        @staticmethod
        def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
            return True  # routed before the experts, by the CPU router

        def apply(
            self,
            output,
            hidden_states,
            w1,
            w2,
            topk_weights,
            topk_ids,
            activation,
            global_num_experts,
            expert_map,
            a1q_scale,
            a2_scale,
            workspace13,
            workspace2,
            expert_tokens_meta,
            apply_router_weight_on_input,
        ) -> None:
            if apply_router_weight_on_input:  # the kernel weights on combine: never twice
                raise NotImplementedError("apply_router_weight_on_input is not supported")
            fused_experts_cpu(
                output, hidden_states, w1, w2, topk_weights, topk_ids, CPUQuantMethod.UNQUANT,
                None, None, None, None, None,  # scales, zero points, block size: none
            )  # fmt: skip

    return SglCPUUnquantizedExperts


def _accepting_sgl_shapes(original_check):
    def check_cpu_sgl_kernel(n: int, k: int, dtype: torch.dtype) -> bool:
        return original_check(n, k, dtype) or sgl_kernel_fits(n, k, dtype)

    return check_cpu_sgl_kernel


def _sgl_experts_first(original_experts):
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    def backend_to_kernel_cls(backend):
        kernels = original_experts(backend)
        if backend == unquantized.UnquantizedMoeBackend.CPU:
            return [_sgl_experts_class(), *kernels]
        return kernels

    return backend_to_kernel_cls


def apply() -> bool:
    """Widen vLLM's sgl kernel choice on AVX-512 CPUs without AMX; idempotent. True when active."""
    if not envs.sgl_kernels_without_amx() or not avx512_without_amx():
        return False
    if not compat.sgl_kernel_choice_measured():
        logger.info(
            "vLLM %s is outside %s: patch_cpu_sgl_kernels not applied.",
            compat.vllm_version(),
            compat.SGL_KERNELS_MEASURED_ON,
        )
        return False
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    fixed = "AVX-512 CPU without AMX; VLLM_ERNIE_MOE_SGL_KERNELS=0 turns it off"
    return install(
        __name__, utils, "check_cpu_sgl_kernel", _accepting_sgl_shapes,
        importers=("vllm.model_executor.kernels.linear.scaled_mm.cpu",), fixed=fixed,
    ) and install(
        __name__, unquantized, "backend_to_kernel_cls", _sgl_experts_first, fixed=fixed
    )  # fmt: skip
