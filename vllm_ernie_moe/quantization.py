"""vLLM quantization method ``ernie-w8a8-dynamic``: msModelSlim int8 checkpoints on vLLM's kernels.

Two modes, one method:
- a checkpoint with a msModelSlim description JSON is served as it is (picked automatically, see
  ``vllm_ernie_moe/config_hooks.py``); the description's label decides per tensor: W8A8_DYNAMIC,
  W8A16, W4A8_DYNAMIC (routed experts) or FLOAT;
- a BF16/FP16 checkpoint with ``--quantization ernie-w8a8-dynamic`` is quantized at load with
  msModelSlim's formula (``vllm_ernie_moe.w8a8.quantize_rows``): the same int8 weights and scales.

Kernels are vLLM's own where they exist and are exact: oneDNN int8 scaled-mm for W8A8 linear
layers, ``CPUExpertsInt8`` for W8A8 experts, ``CPUExpertsInt4``'s INT4_W4A8 path for W4A8_DYNAMIC
experts (int4 in memory); elsewhere :mod:`vllm_ernie_moe.portable_kernels` (docs/cpu-tiers.md).
vLLM has no CPU GEMM for int8 weights with unquantized activations (its CPU WNA16 kernels take
4-bit weights only). W8A16 weights stay int8 on the portable int8 weight-only GEMM where that is
the faster kernel (CPUs without AVX-512 BF16), else they are dequantized at load onto vLLM's bf16
kernels; ``VLLM_ERNIE_MOE_W8A16_INT8`` decides either way (int8: half the memory).
On Ascend NPUs vllm-ascend loads msModelSlim checkpoints itself (method ``ascend``): this method
refuses to run there rather than shadow it.
"""

import functools

import torch
from torch.nn import Module, Parameter
from vllm._custom_ops import CPUQuantAlgo, CPUQuantMethod
from vllm.distributed import get_ep_group, get_tensor_model_parallel_world_size, get_tp_group
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, int4_w4a16_moe_quant_config
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
    CPUExpertsInt4,
    CPUExpertsInt8,
    prepare_int4_moe_layer_for_cpu,
)
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEActivationFormat
from vllm.model_executor.layers.fused_moe.oracle.int8 import (
    Int8MoeBackend,
    make_int8_moe_kernel,
    make_int8_moe_quant_config,
)
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    kInt4Static,
    kInt8DynamicTokenSym,
    kInt8StaticChannelSym,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from vllm_ernie_moe import compat, envs, portable_kernels
from vllm_ernie_moe.patches.patch_cpu_router import biased_softmax_topk
from vllm_ernie_moe.w8a8 import (
    QUANTIZATION_NAME,
    W4A8_DYNAMIC,
    W8A8_DYNAMIC,
    W8A16,
    ModelSlimDescription,
    QuantizationFormatError,
    find_description,
    load_description,
    quantize_rows,
    unpack_int4_rows,
)

logger = init_logger(f"vllm.{__name__}")


def _row_amax(weight: torch.Tensor, group=None) -> torch.Tensor:
    """Per-row max of ``|weight|``; over the ranks of ``group`` when each holds part of a row."""
    amax = weight.abs().amax(dim=-1, keepdim=True)
    if group is not None:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


def _register_linear_scale(layer: Module, rows: int, weight_loader) -> None:
    """``weight_scale`` [out, 1] fp32 of an int8 linear, sharded with the output rows."""
    layer.register_parameter(
        "weight_scale",
        ChannelQuantScaleParameter(
            data=torch.empty(rows, 1, dtype=torch.float32),
            output_dim=0,
            weight_loader=weight_loader,
        ),
    )


def _register_expert_scale(
    layer: Module, weight_name: str, experts_and_rows: tuple[int, int], extra_weight_attrs: dict
) -> None:
    """``<weight_name>_scale`` [E, out, 1] fp32 of int8 experts, loaded per output channel."""
    scale = Parameter(torch.empty(*experts_and_rows, 1, dtype=torch.float32), requires_grad=False)
    layer.register_parameter(f"{weight_name}_scale", scale)
    set_weight_attrs(
        scale,
        {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.CHANNEL.value},
    )


def _dequantize(layer: Module, weight_name: str, dtype: torch.dtype) -> None:
    """Replace int8 ``weight_name`` by ``int8 * scale`` in ``dtype`` (fp32 product, then cast) and
    drop the scale."""
    scale_name = f"{weight_name}_scale"
    weight = getattr(layer, weight_name).float() * getattr(layer, scale_name)
    _set_quantized(layer, weight_name, weight.to(dtype))
    delattr(layer, scale_name)


@functools.cache
def _log_kernel_once(layer_kind: str, kernel: str) -> None:
    """Say once per process which kernel a kind of quantized layer runs on, and the CPU tier."""
    from vllm_ernie_moe import cpu_tier

    tier = cpu_tier.active()
    logger.info(
        "%s: %s runs on %s (CPU tier %s, vLLM library %s).",
        QUANTIZATION_NAME,
        layer_kind,
        kernel,
        tier.name if tier else "other",
        cpu_tier.loaded_library(),
    )


def _set_quantized(layer: Module, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as a new parameter ``name``. Not vLLM's ``replace_parameter``: from 0.33
    on it writes into the existing Parameter, which a tied lm_head shares with the embedding."""
    setattr(layer, name, Parameter(tensor, requires_grad=False))


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

    #: W8A8 quantizes the activations per token; W8A16 keeps them in the model dtype.
    quantize_input = True

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu()

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True  # routed before the experts (CPURouter), or by _RoutesByErnieRule

    def process_weights_after_loading(self, layer: Module) -> None:
        """The weights stay as loaded: int8 ``[E, out, in]``."""

    def _gemm(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
        """``gemm(expert, which, x)`` for :func:`portable_kernels.run_experts`; unquantized
        inputs (W8A16) in ``dtype``, the model's (``run_experts`` hands the down GEMM fp32)."""
        weights, scales = (w1, w2), (self.w1_scale, self.w2_scale)

        def gemm(expert: int, which: int, x: torch.Tensor) -> torch.Tensor:
            x = x if self.quantize_input else x.to(dtype)
            weight, scale = weights[which][expert], scales[which][expert].view(-1)
            return portable_kernels.int8_gemm(x, weight, scale, self.quantize_input)

        return gemm

    def _experts(self, hidden_states, w1, w2, topk_weights, topk_ids) -> torch.Tensor:
        gemm = self._gemm(w1, w2, hidden_states.dtype)
        return portable_kernels.run_experts(hidden_states, topk_weights, topk_ids, gemm)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *args, **kwargs):
        output.copy_(self._experts(hidden_states, w1, w2, topk_weights, topk_ids))


class PortableCPUExpertsInt8(_PortableExperts, CPUExpertsInt8):
    """W8A8 experts: int8 weights, per-token int8 activations."""


class PortableCPUExpertsW8A16(PortableCPUExpertsInt8):
    """W8A16 experts: int8 weights, activations in the model dtype."""

    quantize_input = False


class PortableCPUExpertsInt4(_PortableExperts, CPUExpertsInt4):
    """W4A8 experts: int4 in memory (``_weight_int4pack_mm_for_cpu``'s layout), per-token int8
    activations."""

    def process_weights_after_loading(self, layer: Module) -> None:
        for name in ("w13_weight", "w2_weight"):
            packed_rows = getattr(layer, name).data  # msModelSlim's [E, out/2, in]
            repacked = [portable_kernels.pack_int4(unpack_int4_rows(rows)) for rows in packed_rows]
            _set_quantized(layer, name, torch.stack(repacked))

    def _gemm(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
        weights, scales = (w1, w2), (self.w1_scale, self.w2_scale)
        return lambda expert, which, x: portable_kernels.int4_gemm(
            x, weights[which][expert], scales[which][expert].view(-1)
        )


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
        topk_weights, topk_ids = biased_softmax_topk(
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


def cpu_experts_class(int4: bool) -> type:
    """The W8A8 / W4A8 experts for this CPU and vLLM: vLLM's fused kernel where it exists and is
    exact, else the portable one."""
    if vllm_fused_experts_exact():
        return routed_by_ernie_rule(ErnieCPUExpertsInt4 if int4 else ErnieCPUExpertsInt8)
    return routed_by_ernie_rule(PortableCPUExpertsInt4 if int4 else PortableCPUExpertsInt8)


def routed_by_ernie_rule(experts_cls: type) -> type:
    """``experts_cls``, routing by ERNIE's rule where vLLM's quantized experts route (0.27)."""
    return _self_routing(experts_cls) if compat.cpu_experts_route_themselves() else experts_cls


@register_weight_loader_v2_supported_method
class ErnieW8A8LinearMethod(LinearMethodBase):
    """int8 per-channel weights, per-token dynamic int8 activations (oneDNN on CPU)."""

    #: The portable GEMM's mode: W8A8 quantizes the activations per token (W8A16 does not).
    quantize_input = True

    def __init__(self, prequantized: bool) -> None:
        self.prequantized = prequantized

    def create_weights(
        self,
        layer: Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        weight_loader = extra_weight_attrs["weight_loader"]
        rows = sum(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        self.params_dtype = params_dtype
        self.kernel = self._kernel()
        weight_dtype = torch.int8 if self.prequantized else params_dtype
        layer.register_parameter(
            "weight",
            ModelWeightParameter(
                data=torch.empty(rows, input_size_per_partition, dtype=weight_dtype),
                input_dim=1,
                output_dim=0,
                weight_loader=weight_loader,
            ),
        )
        if self.prequantized:
            _register_linear_scale(layer, rows, weight_loader)
        for unused in ("input_scale", "input_zero_point", "azp_adj"):
            layer.register_parameter(unused, None)

    def _kernel(self):
        """vLLM's int8 linear kernel where it is exact, else None (the portable int8 GEMM)."""
        if not portable_kernels.exact_int8_gemm():
            _log_kernel_once("W8A8 linear", "portable int8 (no VNNI: vLLM's oneDNN int8 saturates)")
            return None
        kernel = init_int8_linear_kernel(
            is_channelwise=True,
            is_static_input_scheme=False,
            input_symmetric=True,
            module_name=type(self).__name__,
        )
        _log_kernel_once("W8A8 linear", f"vLLM's {type(kernel).__name__}")
        return kernel

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            weight = layer.weight.data
            # A row-parallel shard holds part of each row: its scale needs the whole row's max.
            sharded = (
                isinstance(layer, RowParallelLinear) and get_tensor_model_parallel_world_size() > 1
            )
            amax = _row_amax(weight, get_tp_group().device_group if sharded else None)
            quantized, scale = quantize_rows(weight, amax)
            _set_quantized(layer, "weight", quantized)
            _set_quantized(layer, "weight_scale", scale)
        if self.kernel is not None:
            self.kernel.process_weights_after_loading(layer)
        else:
            _set_quantized(layer, "weight_scale", layer.weight_scale.data.view(-1))

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        out = portable_kernels.int8_gemm(x, layer.weight, layer.weight_scale, self.quantize_input)
        return out if bias is None else out + bias


class ErnieW8A8MoEMethod(FusedMoEMethodBase):
    """Routed experts in int8 (per-channel weights, per-token activations) on CPUExpertsInt8."""

    #: msModelSlim stores two int4 values per int8 along the output rows (W4A8_DYNAMIC).
    int4_packed = False
    experts_quant_keys = (kInt8StaticChannelSym, kInt8DynamicTokenSym)

    def __init__(self, moe: FusedMoEConfig, prequantized: bool) -> None:
        super().__init__(moe)
        self.prequantized = prequantized
        if not current_platform.is_cpu():
            raise QuantizationFormatError(
                f"{QUANTIZATION_NAME}: quantized experts are implemented for vLLM's CPU backend "
                "only (on Ascend, vllm-ascend serves msModelSlim checkpoints as 'ascend')."
            )
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
        _log_kernel_once("routed experts", self.experts_cls.__name__)

    def experts_class(self) -> type:
        return cpu_experts_class(int4=self.int4_packed)

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
                _register_expert_scale(layer, name, (experts, rows), extra_weight_attrs)
        layer.w13_input_scale = None
        layer.w2_input_scale = None

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name).data
                # down_proj shards its input over the MoE TP ranks (the EP group's span).
                sharded = name == "w2_weight" and self.moe.tp_size > 1
                amax = _row_amax(weight, get_ep_group().device_group if sharded else None)
                quantized, scale = quantize_rows(weight, amax)
                _set_quantized(layer, name, quantized)
                _set_quantized(layer, f"{name}_scale", scale)
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
        """vLLM 0.27: the experts route (``ErnieSelfRoutingCPUExpertsInt8``)."""
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


class ErnieW4A8MoEMethod(ErnieW8A8MoEMethod):
    """msModelSlim W4A8_DYNAMIC routed experts, int4 in memory, on vLLM's CPU ``INT4_W4A8`` kernel
    (int4 weights times per-token int8 activations, as on the NPU).

    Repacked at load: msModelSlim's rows (two int4 per int8 along the output dimension) become
    GPTQ's int32 columns (eight along the input dimension, offset by 8), which vLLM blocks for its
    kernel. The kernel takes group scales only, so each per-channel scale is repeated over groups of
    :func:`int4_group_size` inputs: the same numbers, 1-3% more bytes.
    """

    int4_packed = True
    experts_quant_keys = (kInt4Static, None)

    def process_weights_after_loading(self, layer: Module) -> None:
        if not vllm_fused_experts_exact():  # the portable experts repack for their own kernel
            self._make_kernel(layer)
            return
        names = ("w13_weight", "w2_weight")
        blocked = prepare_int4_moe_layer_for_cpu(
            *(gptq_int4_columns(getattr(layer, name).data) for name in names),
            *(
                group_scales(
                    getattr(layer, f"{name}_scale").data,
                    getattr(layer, name).shape[-1],
                    int4_group_size(self.moe),
                )
                for name in names
            ),
            quant_algo=CPUQuantAlgo.GPTQ,
        )
        kernel_names = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale",
                        "w13_zero", "w2_zero")  # fmt: skip
        for name, tensor in zip(kernel_names, blocked, strict=True):
            _set_quantized(layer, name, tensor)
        self._make_kernel(layer)

    def get_fused_moe_quant_config(self, layer: Module):
        if not vllm_fused_experts_exact():  # per-channel scales, as loaded
            return super().get_fused_moe_quant_config(layer)
        return int4_w4a16_moe_quant_config(
            w1_scale=layer.w13_weight_scale,
            w2_scale=layer.w2_weight_scale,
            w1_zp=layer.w13_zero,
            w2_zp=layer.w2_zero,
            block_shape=[0, int4_group_size(self.moe)],
        )


def w8a16_int8_in_memory() -> bool:
    """Keep W8A16 weights int8 (``VLLM_ERNIE_MOE_W8A16_INT8``; default: where the portable int8
    weight-only GEMM is the faster kernel), else dequantize them at load."""
    chosen = envs.w8a16_int8_in_memory()
    return portable_kernels.int8_weight_only_beats_bf16() if chosen is None else chosen


def _w8a16_method(layer: Module, experts: bool):
    if w8a16_int8_in_memory():
        return ErnieW8A16MoEMethod(layer.moe_config) if experts else ErnieW8A16LinearMethod()
    _log_kernel_once("W8A16", "vLLM's unquantized kernels (dequantized at load)")
    return (
        ErnieW8A16DequantizedMoEMethod(layer.moe_config)
        if experts
        else ErnieW8A16DequantizedLinearMethod()
    )


def int4_group_size(moe: FusedMoEConfig) -> int:
    """The largest group the int4 kernel takes (128, 64 or 32) that divides both GEMMs' inputs;
    one group per row gives wrong results on AVX512 (measured on vLLM 0.32)."""
    inputs = (moe.hidden_dim, moe.intermediate_size_per_partition)
    return next(g for g in (128, 64, 32) if all(k % g == 0 for k in inputs))


def group_scales(scale: torch.Tensor, inputs: int, group: int) -> torch.Tensor:
    """Per-channel ``[E, out, 1]`` scales as the int4 kernel's ``[E, inputs / group, out]``."""
    return scale.transpose(1, 2).expand(-1, inputs // group, -1).contiguous()


def gptq_int4_columns(packed_rows: torch.Tensor) -> torch.Tensor:
    """msModelSlim's ``[E, out/2, in]`` int4 pairs -> GPTQ's ``[E, in/8, out]`` int32: input
    ``8i + j`` in bits ``4j..4j+3`` of word ``i``, as ``value + 8``. Built as bytes (two inputs
    each, read four at a time as a little-endian word: the kernel runs on x86 only): 12 ms an
    expert of the 21B, where shifting int32 nibbles took 150 ms. One expert at a time keeps the
    temporaries small."""
    experts, half_rows, inputs = packed_rows.shape
    columns = torch.empty(experts, inputs // 8, 2 * half_rows, dtype=torch.int32)
    for expert in range(experts):
        unsigned = (unpack_int4_rows(packed_rows[expert]) + 8).to(torch.uint8)  # [out, in]
        pairs = unsigned.view(2 * half_rows, inputs // 2, 2)
        nibble_pairs = pairs[..., 0] | (pairs[..., 1] << 4)  # [out, in/2]
        columns[expert] = nibble_pairs.view(torch.int32).T  # [in/8, out]
    return columns


@register_weight_loader_v2_supported_method  # vLLM checks the exact class
class ErnieW8A16LinearMethod(ErnieW8A8LinearMethod):
    """msModelSlim W8A16 linear: int8 per-channel weights in memory, activations in the model
    dtype, on the portable int8 weight-only GEMM (:func:`w8a16_int8_in_memory`)."""

    quantize_input = False

    def __init__(self) -> None:
        super().__init__(prequantized=True)

    def _kernel(self) -> None:
        _log_kernel_once("W8A16 linear", "portable int8 weight-only (torch._weight_int8pack_mm)")
        return None

    def process_weights_after_loading(self, layer: Module) -> None:
        """The scale in the model dtype, as the kernel takes it (and vllm-ascend's W8A16)."""
        scale = layer.weight_scale.data.view(-1).to(self.params_dtype)
        _set_quantized(layer, "weight_scale", scale)


class ErnieW8A16MoEMethod(ErnieW8A8MoEMethod):
    """msModelSlim W8A16 routed experts: int8 per-channel weights in memory, activations in the
    model dtype (:class:`PortableCPUExpertsW8A16`)."""

    def __init__(self, moe: FusedMoEConfig) -> None:
        super().__init__(moe, prequantized=True)

    def experts_class(self) -> type:
        return routed_by_ernie_rule(PortableCPUExpertsW8A16)


@register_weight_loader_v2_supported_method
class ErnieW8A16DequantizedLinearMethod(UnquantizedLinearMethod):
    """msModelSlim W8A16 linear, dequantized at load onto vLLM's unquantized kernels."""

    def create_weights(
        self,
        layer: Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        self.params_dtype = params_dtype
        weight_loader = extra_weight_attrs["weight_loader"]
        super().create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            torch.int8,
            **extra_weight_attrs,
        )
        _register_linear_scale(layer, sum(output_partition_sizes), weight_loader)

    def process_weights_after_loading(self, layer: Module) -> None:
        _dequantize(layer, "weight", self.params_dtype)
        super().process_weights_after_loading(layer)


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
            _register_expert_scale(layer, name, getattr(layer, name).shape[:2], extra_weight_attrs)

    def process_weights_after_loading(self, layer: Module) -> None:
        for name in ("w13_weight", "w2_weight"):
            _dequantize(layer, name, self.params_dtype)
        super().process_weights_after_loading(layer)


@register_quantization_config(QUANTIZATION_NAME)
class ErnieW8A8DynamicConfig(QuantizationConfig):
    """msModelSlim W8A8_DYNAMIC, W8A16 and W4A8_DYNAMIC: served from the description JSON;
    W8A8_DYNAMIC also applied to BF16 at load."""

    def __init__(self) -> None:
        super().__init__()
        self.description: ModelSlimDescription | None = None
        self.int8_lm_head = False

    def get_name(self) -> str:
        return QUANTIZATION_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]  # vLLM's int8 MoE kernel has no fp32 path

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the description JSON is optional: read in maybe_update_config

    @classmethod
    def from_config(cls, config: dict) -> "ErnieW8A8DynamicConfig":
        return cls()

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        if current_platform.device_type == "npu":
            raise QuantizationFormatError(
                f"--quantization {QUANTIZATION_NAME} is for CPU: on Ascend NPUs vllm-ascend serves "
                "msModelSlim checkpoints itself. Drop the flag (it is auto-detected as 'ascend')."
            )
        path = find_description(model_name)
        self.description = load_description(path) if path else None
        self.int8_lm_head = envs.int8_lm_head()
        if self.int8_lm_head:
            logger.info("%s: quantizing the lm_head to int8 at load.", QUANTIZATION_NAME)
        if self.description is None:
            logger.info("%s: quantizing the weights of %s at load.", QUANTIZATION_NAME, model_name)
        else:
            logger.info("%s: serving msModelSlim checkpoint %s.", QUANTIZATION_NAME, path)

    def _label(self, checkpoint_module: str) -> str:
        """The label of a vLLM module: that of its first checkpoint tensor (``load_description``
        has checked that the tensors of a fused module agree)."""
        assert self.description is not None
        return self.description.label(f"{checkpoint_module}.weight")

    def _first_checkpoint_module(self, layer: Module, prefix: str) -> str:
        parent, _, name = prefix.rpartition(".")
        if isinstance(layer, RoutedExperts):
            return f"{prefix}.0.gate_proj"
        shards = self.packed_modules_mapping.get(name)
        return f"{parent}.{shards[0]}" if shards else prefix

    def get_quant_method(self, layer: Module, prefix: str):
        if isinstance(layer, ParallelLMHead) and self.int8_lm_head:
            # Checkpoints keep the lm_head FLOAT (msModelSlim does): quantized at load. A tied
            # lm_head shares the embedding until then and gets its own int8 copy.
            return ErnieW8A8LinearMethod(prequantized=False)
        if not isinstance(layer, (LinearBase, RoutedExperts)):
            return None  # embeddings, lm_head, attention: unquantized
        prefix = prefix.removesuffix(".routed_experts")
        prequantized = self.description is not None
        label = (
            self._label(self._first_checkpoint_module(layer, prefix))
            if prequantized
            else W8A8_DYNAMIC
        )
        experts = isinstance(layer, RoutedExperts)
        if label == W8A8_DYNAMIC:
            return (
                ErnieW8A8MoEMethod(layer.moe_config, prequantized)
                if experts
                else ErnieW8A8LinearMethod(prequantized)
            )
        if label == W8A16:
            return _w8a16_method(layer, experts)
        if label == W4A8_DYNAMIC:  # routed experts only (load_description checks)
            return ErnieW4A8MoEMethod(layer.moe_config, prequantized)
        return UnquantizedFusedMoEMethod(layer.moe_config) if experts else UnquantizedLinearMethod()
