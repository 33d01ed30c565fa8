"""Adapters of vLLM's CPU expert kernels for ERNIE's quantized experts.

- Applies to: vLLM's ``vllm.model_executor.layers.fused_moe.experts.cpu_moe`` (``CPUExpertsInt8``,
  ``CPUExpertsInt4``) in 0.27.1, 0.32.0 and 0.33.0 (its source is checked by
  ``tests/test_vllm_api.py``). The subclasses override the kernel-selection hooks
  (``_supports_current_device``, ``_supports_routing_method``) and ``apply``: a vLLM that renames
  them breaks these classes first.
- Version differences (through ``compat``): on 0.27 the quantized experts route the router logits
  themselves, so :func:`routed_by_ernie_rule` adds ERNIE's rule there; on 0.32+ the (patched)
  ``CPURouter`` routes before the experts.
- Kernels: vLLM's fused int8 / int4 experts where its library has them and they are exact (VNNI);
  else :mod:`vllm_ernie_moe.portable_kernels` on every x86 tier (docs/cpu-tiers.md).
"""

import functools
from collections.abc import Callable

import torch
from torch.nn import Module
from vllm._custom_ops import CPUQuantMethod
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4, CPUExpertsInt8
from vllm.platforms import current_platform

from vllm_ernie_moe import compat, envs, native_int4, portable_kernels
from vllm_ernie_moe.quant.common import log_kernel_once, set_parameter
from vllm_ernie_moe.quant.msmodelslim import unpack_int4_rows
from vllm_ernie_moe.quant.repack_cache import cached_repack
from vllm_ernie_moe.routing import ernie_topk


class _ErnieCPUExperts:
    """vLLM's quantized CPU experts (``fused_experts_cpu``), accepted for ERNIE's routing and on
    AVX512-VNNI CPUs with or without AMX.

    Upstream refuses them for "routing method Unspecified" (softmax + correction bias), but on
    vLLM 0.32+ the experts never route: ``CPURouter`` (patched) computes the ids and weights before
    ``apply``, exactly as for ``CPUUnquantizedExperts`` (vLLM 0.27: see ``_RoutesByErnieRule``).
    Upstream also asks for AMX (0.32's int4 experts); the kernels' int8 and int4 paths run on
    AVX512-VNNI too (tests/test_w8a8.py and tests/test_w4a8.py compare them with references).
    """

    cpu_quant_method: int

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu() and vllm_fused_experts_exact()

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True

    def _experts(self, hidden_states, w1, w2, topk_weights, topk_ids) -> torch.Tensor:
        """vLLM 0.27's call (the experts route themselves there: ``_RoutesByErnieRule``)."""
        from vllm._custom_ops import fused_experts_cpu

        return fused_experts_cpu(
            hidden_states, w1, w2, topk_weights, topk_ids, False, self.cpu_quant_method,
            self.w1_scale, self.w2_scale, self.w1_zp, self.w2_zp,
            None, None, None, None, None,  # block, biases, alpha, limit
            True,  # VNNI-packed weights
        )  # fmt: skip


class ErnieCPUExpertsInt8(_ErnieCPUExperts, CPUExpertsInt8):
    """int8 weights, per-token int8 activations (``CPUQuantMethod.INT8_W8A8``)."""

    cpu_quant_method = CPUQuantMethod.INT8_W8A8


class ErnieCPUExpertsInt4(_ErnieCPUExperts, CPUExpertsInt4):
    """int4 weights, per-token int8 activations (``CPUQuantMethod.INT4_W4A8``)."""

    cpu_quant_method = CPUQuantMethod.INT4_W4A8


class _PortableExperts:
    """Experts on :mod:`vllm_ernie_moe.portable_kernels`: every x86 tier, for CPUs where vLLM's
    fused quantized experts are missing (AVX2, AVX-512 without BF16) or inexact (no VNNI)."""

    #: :data:`portable_kernels.EXPERT_FORMATS`
    weight_format = "w8a8"

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu()

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True  # routed before the experts (CPURouter), or by _RoutesByErnieRule

    def process_weights_after_loading(self, layer: Module) -> None:
        """The weights stay as loaded: int8 ``[E, out, in]``."""

    def _experts(self, hidden_states, w1, w2, topk_weights, topk_ids) -> torch.Tensor:
        return portable_kernels.experts(
            hidden_states, topk_weights, topk_ids, w1, w2, self.w1_scale, self.w2_scale,
            self.weight_format,
        )  # fmt: skip

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *args, **kwargs):
        output.copy_(self._experts(hidden_states, w1, w2, topk_weights, topk_ids))


class PortableCPUExpertsInt8(_PortableExperts, CPUExpertsInt8):
    """W8A8 experts: int8 weights, per-token int8 activations."""


class PortableCPUExpertsW8A16(PortableCPUExpertsInt8):
    """W8A16 experts: int8 weights, activations in the model dtype."""

    weight_format = "w8a16"


class PortableCPUExpertsInt4(_PortableExperts, CPUExpertsInt4):
    """W4A8 experts: int4 in memory (``_weight_int4pack_mm_for_cpu``'s layout), per-token int8
    activations."""

    weight_format = "w4a8"

    def process_weights_after_loading(self, layer: Module) -> None:
        repack_int4_experts(layer, "torch-int4pack-experts", portable_kernels.pack_int4)


def repack_int4_experts(layer: Module, kind: str, layout: Callable) -> None:
    """Each expert's msModelSlim int4 rows ``[E, out/2, in]`` as ``layout(values [out, in])``,
    through the repack cache under ``kind``."""
    for name in ("w13_weight", "w2_weight"):
        packed_rows = getattr(layer, name).data

        def repack(packed_rows=packed_rows) -> dict[str, torch.Tensor]:
            return {"weight": torch.stack([layout(unpack_int4_rows(r)) for r in packed_rows])}

        set_parameter(layer, name, cached_repack(kind, [packed_rows], repack)["weight"])


class PortableCPUExpertsW4A16(PortableCPUExpertsInt4):
    """W4A16 experts: int4 in memory, group scales, activations in the model dtype."""

    weight_format = "w4a16"

    def process_weights_after_loading(self, layer: Module) -> None:
        if self._on_avx2_kernel(layer):
            self._avx2_layout(layer)
            return
        super().process_weights_after_loading(layer)
        for scale in (self.w1_scale, self.w2_scale):
            # In place: the quant config made from the layer holds these very parameters.
            dtype = self.moe_config.in_dtype
            scale.data = portable_kernels.int4_scales_and_zeros(scale.data, dtype)

    def _on_avx2_kernel(self, layer: Module) -> bool:
        """Both GEMMs fit the AVX2 kernel (``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL``)."""
        return all(
            native_int4.serves(inputs, inputs // scale.shape[-1])
            for inputs, scale in (
                (layer.w13_weight.shape[-1], self.w1_scale),
                (layer.w2_weight.shape[-1], self.w2_scale),
            )
        )

    def _avx2_layout(self, layer: Module) -> None:
        """The weights in the AVX2 kernel's layout (kept in the repack cache), the scales rounded
        to the model dtype and held in fp32."""
        log_kernel_once("W4A16 experts on the AVX2 kernel", native_int4.KERNEL_DESCRIPTION)
        self.weight_format = "w4a16-avx2"
        repack_int4_experts(layer, "avx2-int4-experts", native_int4.avx2_layout)
        for scale in (self.w1_scale, self.w2_scale):
            # In place: the quant config made from the layer holds these very parameters.
            scale.data = scale.data.to(self.moe_config.in_dtype).float()


class _RoutesByErnieRule:
    """vLLM 0.27's quantized CPU experts are monolithic: they route the router logits themselves
    and, for softmax + correction bias, drop the bias and the renormalisation. Route by ERNIE's
    rule here, then run the experts (``_experts``: vLLM's kernel or the portable one)."""

    def apply(
        self,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        router_logits: torch.Tensor,
        activation,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        num_expert_group: int | None = None,
        e_score_correction_bias: torch.Tensor | None = None,
        routed_scaling_factor: float | None = None,
        topk_group: int | None = None,
    ) -> torch.Tensor:
        topk_weights, topk_ids = ernie_topk(
            router_logits, e_score_correction_bias, self.moe_config.experts_per_token, True
        )
        return self._experts(hidden_states, w1, w2, topk_weights, topk_ids)


def vllm_fused_experts_exact() -> bool:
    """vLLM's fused int8/int4 experts exist in the loaded library (its AVX-512 BF16 one) and run
    exact (VNNI)."""
    return hasattr(torch.ops._C, "fused_experts_cpu") and portable_kernels.exact_int8_gemm()


@functools.cache
def _self_routing(experts_cls: type) -> type:
    return type(f"SelfRouting{experts_cls.__name__}", (_RoutesByErnieRule, experts_cls), {})


def vllm_kernel_serves(weight_format: str) -> bool:
    """Whether vLLM's fused kernels serve ``weight_format`` here (else the portable ones): where
    they are exact, and for W4A16 only while ``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS`` allows, as
    vLLM's int4 kernels quantize the activations to int8 per token inside."""
    if weight_format == "w4a16" and not envs.w4a16_int8_activations():
        return False
    return vllm_fused_experts_exact()


#: Weight format -> (vLLM's fused experts, the portable ones). W4A16 shares vLLM's int4 kernel
#: (activations int8 inside) but keeps model-dtype activations on the portable path.
_EXPERTS_BY_FORMAT = {
    "w8a8": (ErnieCPUExpertsInt8, PortableCPUExpertsInt8),
    "w4a8": (ErnieCPUExpertsInt4, PortableCPUExpertsInt4),
    "w4a16": (ErnieCPUExpertsInt4, PortableCPUExpertsW4A16),
}


def cpu_experts_class(weight_format: str) -> type:
    """The experts of ``weight_format`` (a key of :data:`_EXPERTS_BY_FORMAT`) for this CPU and
    vLLM: vLLM's fused kernel where :func:`vllm_kernel_serves`, else the portable one."""
    fused, portable = _EXPERTS_BY_FORMAT[weight_format]
    return routed_by_ernie_rule(fused if vllm_kernel_serves(weight_format) else portable)


def routed_by_ernie_rule(experts_cls: type) -> type:
    """``experts_cls``, routing by ERNIE's rule where vLLM's quantized experts route (0.27)."""
    return _self_routing(experts_cls) if compat.cpu_experts_route_themselves() else experts_cls
