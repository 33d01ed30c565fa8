"""Routed-expert methods: W8A8_DYNAMIC, W4A8_DYNAMIC and W4A16 on vLLM's CPU expert kernels or the
portable ones (:mod:`~vllm_ernie_moe.quant.cpu_experts`), W8A16 int8 in memory or dequantized."""

import torch
from torch.nn import Module, Parameter
from vllm.distributed import get_ep_group
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, int4_w4a16_moe_quant_config
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEActivationFormat
from vllm.model_executor.layers.fused_moe.oracle.int8 import (
    Int8MoeBackend,
    make_int8_moe_kernel,
    make_int8_moe_quant_config,
)
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    kInt4Static,
    kInt8DynamicTokenSym,
    kInt8StaticChannelSym,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from vllm_ernie_moe.quant.common import (
    dequantize,
    log_kernel_once,
    register_expert_scale,
    row_amax,
    set_parameter,
)
from vllm_ernie_moe.quant.cpu_experts import (
    PortableCPUExpertsW8A16,
    cpu_experts_class,
    routed_by_ernie_rule,
    vllm_kernel_serves,
)
from vllm_ernie_moe.quant.int4 import group_scales, int4_group_size, vllm_int4_blocked
from vllm_ernie_moe.quant.msmodelslim import (
    QUANTIZATION_NAME,
    QuantizationFormatError,
    quantize_rows,
)
from vllm_ernie_moe.quant.repack_cache import StoredRepackMethod


class ErnieW8A8MoEMethod(FusedMoEMethodBase):
    """Routed experts in int8 (per-channel weights, per-token activations) on CPUExpertsInt8."""

    #: msModelSlim stores two int4 values per int8 along the output rows (W4A8_DYNAMIC).
    int4_packed = False
    #: :func:`cpu_experts_class`'s key
    weight_format = "w8a8"
    experts_quant_keys = (kInt8StaticChannelSym, kInt8DynamicTokenSym)

    def __init__(self, moe: FusedMoEConfig, prequantized: bool) -> None:
        super().__init__(moe)
        self.prequantized = prequantized
        if not current_platform.is_cpu():
            raise QuantizationFormatError(
                f"{QUANTIZATION_NAME}: quantized experts are implemented for vLLM's CPU backend "
                "only (on Ascend, vllm-ascend serves msModelSlim checkpoints as 'ascend')."
            )
        # Decided once, here: the repack and the quant config follow the experts chosen now.
        self.on_vllm_kernel = vllm_kernel_serves(self.weight_format)
        self.experts_cls = self.experts_class()
        supported, why = self.experts_cls.is_supported_config(
            self.experts_cls, moe, *self.experts_quant_keys, FusedMoEActivationFormat.Standard
        )
        if not supported:
            raise QuantizationFormatError(
                f"{QUANTIZATION_NAME}: the quantized CPU experts ({self.experts_cls.__name__}) "
                f"cannot run this layer: {why} (hidden_size {moe.hidden_dim}, "
                f"moe_intermediate_size per TP rank {moe.intermediate_size_per_partition}). "
                "Use a tensor-parallel size that keeps both multiples of 32."
            )
        log_kernel_once("routed experts", self.experts_cls.__name__)

    def experts_class(self) -> type:
        return cpu_experts_class(self.weight_format)

    def scale_groups(self, hidden: int, intermediate: int, weight_name: str) -> int | None:
        """Scales per row of ``weight_name`` (None: one per output channel)."""
        return None

    def create_weights(
        self,
        layer: Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        weight_dtype = torch.int8 if self.prequantized else params_dtype
        shapes = {
            "w13_weight": (num_experts, 2 * intermediate_size_per_partition, hidden_size),
            "w2_weight": (num_experts, hidden_size, intermediate_size_per_partition),
        }
        for name, (experts, rows, columns) in shapes.items():
            stored_rows = rows // 2 if self.int4_packed else rows
            weight = Parameter(
                torch.empty(experts, stored_rows, columns, dtype=weight_dtype), requires_grad=False
            )
            layer.register_parameter(name, weight)
            set_weight_attrs(weight, extra_weight_attrs)
            if self.prequantized:
                groups = self.scale_groups(hidden_size, intermediate_size_per_partition, name)
                register_expert_scale(layer, name, (experts, rows), extra_weight_attrs, groups)
        layer.w13_input_scale = None
        layer.w2_input_scale = None

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name).data
                # down_proj shards its input over the MoE TP ranks (the EP group's span).
                sharded = name == "w2_weight" and self.moe.tp_size > 1
                amax = row_amax(weight, get_ep_group().device_group if sharded else None)
                quantized, scale = quantize_rows(weight, amax)
                set_parameter(layer, name, quantized)
                set_parameter(layer, f"{name}_scale", scale)
        self._make_kernel(layer)

    def _make_kernel(self, layer: Module) -> None:
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = make_int8_moe_kernel(
            int8_backend=Int8MoeBackend.CPU,
            moe_quant_config=self.moe_quant_config,
            moe_config=self.moe,
            experts_cls=self.experts_cls,
            routing_tables=layer._expert_routing_tables(),
        )
        self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    def get_fused_moe_quant_config(self, layer: Module):
        return make_int8_moe_quant_config(
            int8_backend=Int8MoeBackend.CPU,
            w1_scale=layer.w13_weight_scale,
            w2_scale=layer.w2_weight_scale,
            per_act_token_quant=True,
        )

    def apply_monolithic(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """vLLM 0.27: the experts route (``cpu_experts.routed_by_ernie_rule``)."""
        return self.moe_kernel.apply_monolithic(
            x,
            layer.w13_weight,
            layer.w2_weight,
            router_logits,
            activation=layer.activation,
            global_num_experts=layer.global_num_experts,
            expert_map=layer.expert_map,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            e_score_correction_bias=layer.e_score_correction_bias,
        )

    def apply(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.moe_kernel.apply(
            x,
            layer.w13_weight,
            layer.w2_weight,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            activation=layer.activation,
            global_num_experts=layer.global_num_experts,
            expert_map=layer.expert_map,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            shared_experts=shared_experts,
            shared_experts_input=shared_experts_input,
        )


class ErnieW4A8MoEMethod(StoredRepackMethod, ErnieW8A8MoEMethod):
    """msModelSlim W4A8_DYNAMIC routed experts, int4 in memory, on vLLM's CPU ``INT4_W4A8`` kernel
    (int4 weights times per-token int8 activations, as on the NPU).

    Repacked at load: msModelSlim's rows (two int4 per int8 along the output dimension) become
    GPTQ's int32 columns (eight along the input dimension, offset by 8), which vLLM blocks for its
    kernel. The kernel takes group scales only, so each per-channel scale is repeated over groups of
    :func:`int4_group_size` inputs: the same numbers, 1-3% more bytes. The repack is stored
    (:mod:`~vllm_ernie_moe.quant.repack_cache`); a warm start does not load these experts.
    """

    int4_packed = True
    weight_format = "w4a8"
    experts_quant_keys = (kInt4Static, None)
    replaced_by_repack = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")

    def repack_kind(self) -> str | None:
        if not self.on_vllm_kernel:  # the portable experts repack their own
            return None
        return f"vllm-int4-experts-gptq-group{self.kernel_group_size()}"

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.on_vllm_kernel:
            self._make_kernel(layer)
            return
        names = ("w13_weight", "w2_weight")
        weights = [getattr(layer, name).data for name in names]
        scales = [getattr(layer, f"{name}_scale").data for name in names]

        def repack() -> dict[str, torch.Tensor]:
            blocked = {}
            for name, weight, scale in zip(names, weights, scales, strict=True):
                kernel_scale = self.kernel_scales(scale, weight.shape[-1])
                weight, zero, kernel_scale = vllm_int4_blocked(weight, kernel_scale)
                zero_name = name.replace("_weight", "_zero")
                blocked |= {name: weight, f"{name}_scale": kernel_scale, zero_name: zero}
            return blocked

        for name, tensor in self.stored_or_repacked(weights + scales, repack).items():
            set_parameter(layer, name, tensor)
        self._make_kernel(layer)

    def get_fused_moe_quant_config(self, layer: Module):
        if not self.on_vllm_kernel:  # per-channel scales, as loaded
            return super().get_fused_moe_quant_config(layer)
        return int4_w4a16_moe_quant_config(
            w1_scale=layer.w13_weight_scale,
            w2_scale=layer.w2_weight_scale,
            w1_zp=layer.w13_zero,
            w2_zp=layer.w2_zero,
            block_shape=[0, self.kernel_group_size()],
        )

    def kernel_scales(self, scale: torch.Tensor, inputs: int) -> torch.Tensor:
        """The checkpoint's scales as the int4 kernel's ``[E, inputs / group, out]``."""
        return group_scales(scale, inputs, self.kernel_group_size())

    def kernel_group_size(self) -> int:
        return int4_group_size(self.moe)


class ErnieW4A16MoEMethod(ErnieW4A8MoEMethod):
    """msModelSlim W4A16 routed experts: int4 weights with a scale per group of ``group_size``
    inputs. On vLLM's fused int4 experts (where exact) as vLLM serves GPTQ W4A16 experts on CPU:
    that kernel quantizes the activations to int8 per token inside; elsewhere on the portable
    experts, activations in the model dtype (``PortableCPUExpertsW4A16``)."""

    weight_format = "w4a16"

    def __init__(self, moe: FusedMoEConfig, group_size: int, prefix: str) -> None:
        inputs = (moe.hidden_dim, moe.intermediate_size_per_partition)
        if any(k % group_size for k in inputs):
            raise QuantizationFormatError(
                f"W4A16 experts '{prefix}': hidden_size {inputs[0]} and moe_intermediate_size per "
                f"tensor-parallel rank {inputs[1]} must be multiples of the group size "
                f"{group_size}: choose a tensor-parallel size that keeps them so, or re-quantize "
                "with a smaller group_size."
            )
        self.group_size = group_size
        super().__init__(moe, prequantized=True)

    def scale_groups(self, hidden: int, intermediate: int, weight_name: str) -> int:
        return (hidden if weight_name == "w13_weight" else intermediate) // self.group_size

    def kernel_scales(self, scale: torch.Tensor, inputs: int) -> torch.Tensor:
        return scale.transpose(1, 2).contiguous()

    def kernel_group_size(self) -> int:
        return self.group_size


class ErnieW8A16MoEMethod(ErnieW8A8MoEMethod):
    """msModelSlim W8A16 routed experts: int8 per-channel weights in memory, activations in the
    model dtype (:class:`PortableCPUExpertsW8A16`)."""

    def __init__(self, moe: FusedMoEConfig) -> None:
        super().__init__(moe, prequantized=True)

    def experts_class(self) -> type:
        return routed_by_ernie_rule(PortableCPUExpertsW8A16)


class ErnieW8A16DequantizedMoEMethod(UnquantizedFusedMoEMethod):
    """msModelSlim W8A16 routed experts, dequantized at load onto vLLM's unquantized experts."""

    def create_weights(
        self,
        layer: Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        self.params_dtype = params_dtype
        super().create_weights(
            layer,
            num_experts,
            hidden_size,
            intermediate_size_per_partition,
            torch.int8,
            **extra_weight_attrs,
        )
        for name in ("w13_weight", "w2_weight"):
            register_expert_scale(layer, name, getattr(layer, name).shape[:2], extra_weight_attrs)

    def process_weights_after_loading(self, layer: Module) -> None:
        for name in ("w13_weight", "w2_weight"):
            dequantize(layer, name, self.params_dtype)
        super().process_weights_after_loading(layer)
