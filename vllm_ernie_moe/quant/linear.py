"""Linear methods: W8A8_DYNAMIC (vLLM's int8 kernel, or the portable one without VNNI), W8A16
(int8 in memory on the portable weight-only GEMM, or dequantized onto vLLM's unquantized one) and
W4A16 (int4 in memory: vLLM's int4 linear where exact, else PyTorch's int4 weight-only GEMM)."""

import functools

import torch
from torch.nn import Module
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from vllm_ernie_moe import compat, envs, native_int4, portable_kernels
from vllm_ernie_moe.quant.common import (
    dequantize,
    log_kernel_once,
    register_linear_scale,
    row_amax,
    set_parameter,
)
from vllm_ernie_moe.quant.cpu_experts import vllm_kernel_serves
from vllm_ernie_moe.quant.int4 import (
    VLLM_INT4_OUTPUT_BLOCK,
    int4_linear,
    int8_copy,
    int8_copy_fits,
    sgl_int8_linear,
    sgl_int8_packed,
    vllm_int4_blocked,
)
from vllm_ernie_moe.quant.msmodelslim import (
    QuantizationFormatError,
    quantize_rows,
    unpack_int4_rows,
)
from vllm_ernie_moe.quant.repack_cache import StoredRepackMethod


@register_weight_loader_v2_supported_method
class ErnieW8A8LinearMethod(StoredRepackMethod, LinearMethodBase):
    """int8 per-channel weights, per-token dynamic int8 activations (oneDNN on CPU). Weights
    quantized at load (the int8 lm_head) are kept in the repack cache: 2.6 of the 4.5 s of a warm
    28-layer start's weight processing (docs/notes/startup-breakdown.md). Where vLLM's kernel
    would run them on its sgl int8 GEMM, they are stored in that GEMM's packed layout and it is
    called directly: vLLM's kernel class packs what it is given, 0.48 s per start for the 21B's
    head."""

    #: The portable GEMM's mode: W8A8 quantizes the activations per token (W8A16 does not).
    quantize_input = True

    def __init__(self, prequantized: bool) -> None:
        self.prequantized = prequantized
        self.stores_sgl_layout = False

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
        self.stores_sgl_layout = (
            not self.prequantized
            and self.kernel is not None
            and compat.cpu_int8_linear_takes_sgl(rows, input_size_per_partition)
        )
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
            register_linear_scale(layer, rows, weight_loader)
        for unused in ("input_scale", "input_zero_point", "azp_adj"):
            layer.register_parameter(unused, None)

    def _kernel(self):
        """vLLM's int8 linear kernel where it is exact, else None (the portable int8 GEMM)."""
        if not portable_kernels.exact_int8_gemm():
            log_kernel_once("W8A8 linear", "portable int8 (no VNNI: vLLM's oneDNN int8 saturates)")
            return None
        kernel = init_int8_linear_kernel(
            is_channelwise=True,
            is_static_input_scheme=False,
            input_symmetric=True,
            module_name=type(self).__name__,
        )
        log_kernel_once("W8A8 linear", f"vLLM's {type(kernel).__name__}")
        return kernel

    def repack_kind(self) -> str | None:
        """Quantizing at load is stored, keyed by place; the layer still loads its weight."""
        if self.prequantized:
            return None
        return "int8-rows-sgl-packed-at-load" if self.stores_sgl_layout else "int8-rows-at-load"

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            weight = layer.weight.data
            # A row-parallel shard holds part of each row: its scale needs the whole row's max,
            # a collective every rank must join, so that shard is never served from the cache.
            sharded = (
                isinstance(layer, RowParallelLinear) and get_tensor_model_parallel_world_size() > 1
            )

            def quantize() -> dict[str, torch.Tensor]:
                amax = row_amax(weight, get_tp_group().device_group if sharded else None)
                rows, scale = quantize_rows(weight, amax)
                if self.stores_sgl_layout:
                    return {"weight": sgl_int8_packed(rows), "weight_scale": scale.view(-1)}
                return {"weight": rows, "weight_scale": scale}

            quantized = quantize() if sharded else self.stored_or_repacked([weight], quantize)
            for name, tensor in quantized.items():
                set_parameter(layer, name, tensor)
            if self.stores_sgl_layout:
                return
        if self.kernel is not None:
            self.kernel.process_weights_after_loading(layer)
        else:
            set_parameter(layer, "weight_scale", layer.weight_scale.data.view(-1))

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.stores_sgl_layout:
            out = sgl_int8_linear(x, layer.weight, layer.weight_scale)
        elif self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        else:
            out = portable_kernels.int8_linear(
                x, layer.weight, layer.weight_scale, self.quantize_input
            )
        return out if bias is None else out + bias


@register_weight_loader_v2_supported_method  # vLLM checks the exact class
class ErnieW8A16LinearMethod(ErnieW8A8LinearMethod):
    """msModelSlim W8A16 linear: int8 per-channel weights in memory, activations in the model
    dtype, on the portable int8 weight-only GEMM (:func:`w8a16_int8_in_memory`)."""

    quantize_input = False

    def __init__(self) -> None:
        super().__init__(prequantized=True)

    def _kernel(self) -> None:
        log_kernel_once("W8A16 linear", "portable int8 weight-only (torch._weight_int8pack_mm)")
        return None

    def process_weights_after_loading(self, layer: Module) -> None:
        """The scale in the model dtype, as the kernel takes it (and vllm-ascend's W8A16)."""
        scale = layer.weight_scale.data.view(-1).to(self.params_dtype)
        set_parameter(layer, "weight_scale", scale)


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
        register_linear_scale(layer, sum(output_partition_sizes), weight_loader)

    def process_weights_after_loading(self, layer: Module) -> None:
        dequantize(layer, "weight", self.params_dtype)
        super().process_weights_after_loading(layer)


@register_weight_loader_v2_supported_method
class ErnieW4A16LinearMethod(StoredRepackMethod, LinearMethodBase):
    """msModelSlim W4A16 linear: int4 weights (two per int8 along the output rows, as stored) and
    per-group scales, rounded to the model dtype (as PyTorch's int4 GEMM takes them; vLLM's int4
    linear gets the same rounded values).

    Where :func:`vllm_kernel_serves` W4A16 (VNNI), on vLLM's int4 linear ``int4_scaled_mm_cpu``
    (activations int8 per token inside, as the routed experts' kernel): 2.4-2.6x PyTorch's int4
    GEMM's speed at one token, 1.1-1.4x the dequantized bf16 GEMM's at 1024 (docs/w8a8.md); with
    an int8 copy for calls of 32 rows or more (:func:`envs.w4a16_int8_prefill`). Elsewhere, on
    x86 with AVX2, the plugin's AVX2 int4 kernel where :func:`native_int4.serves` (activations
    int8 per weight group below 128 rows per call); else W4A16's math, activations in the model
    dtype: :func:`portable_kernels.int4_group_linear`."""

    def __init__(self, group_size: int, prefix: str) -> None:
        self.group_size = group_size
        self.prefix = prefix
        self.on_vllm_kernel = False
        self.on_avx2_kernel = False
        self.keeps_int8_copy = False

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
        if input_size_per_partition % self.group_size or any(
            rows % 2 for rows in output_partition_sizes
        ):
            raise QuantizationFormatError(
                f"W4A16 layer '{self.prefix}': {input_size_per_partition} inputs and "
                f"{output_partition_sizes} outputs per tensor-parallel rank do not split into "
                f"whole groups of {self.group_size} inputs and pairs of output rows: choose a "
                "tensor-parallel size that keeps them whole, or re-quantize with a smaller "
                "group_size."
            )
        weight_loader = extra_weight_attrs["weight_loader"]
        rows = sum(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        self.params_dtype = params_dtype
        layer.register_parameter(
            "weight",
            PackedvLLMParameter(
                data=torch.empty(rows // 2, input_size_per_partition, dtype=torch.int8),
                input_dim=1,
                output_dim=0,
                packed_dim=0,
                packed_factor=2,
                weight_loader=weight_loader,
            ),
        )
        layer.register_parameter(
            "weight_scale",
            GroupQuantScaleParameter(
                data=torch.empty(
                    rows, input_size_per_partition // self.group_size, dtype=torch.float32
                ),
                input_dim=1,
                output_dim=0,
                weight_loader=weight_loader,
            ),
        )
        self.on_vllm_kernel = (
            vllm_kernel_serves("w4a16")
            and hasattr(torch.ops._C, "int4_scaled_mm_cpu")
            and rows % VLLM_INT4_OUTPUT_BLOCK == 0
            and params_dtype == torch.bfloat16  # the kernel refuses fp32; bf16 is what ran
        )
        self.keeps_int8_copy = (
            self.on_vllm_kernel
            and envs.w4a16_int8_prefill()
            and int8_copy_fits(rows, input_size_per_partition)
        )
        self.on_avx2_kernel = not self.on_vllm_kernel and native_int4.serves(
            input_size_per_partition, self.group_size
        )
        if self.on_avx2_kernel:
            log_kernel_once("W4A16 linear on the AVX2 kernel", native_int4.KERNEL_DESCRIPTION)
            return
        log_kernel_once(
            "W4A16 linear" + (" on vLLM's int4 kernel" if self.on_vllm_kernel else ""),
            "vLLM's int4 linear (int4_scaled_mm_cpu, activations int8 per token)"
            if self.on_vllm_kernel
            else "PyTorch's int4 weight-only GEMM (_weight_int4pack_mm) below "
            f"{portable_kernels.INT4_DEQUANTIZE_FROM_TOKENS} tokens, the "
            f"{portable_kernels.dequantized_gemm_dtype(params_dtype)} GEMM on weights dequantized "
            "per call from there on",
        )

    def repack_kind(self) -> str | None:
        """Linears still load their tensors (the routed experts hold most bytes); keyed by place."""
        return f"vllm-int4-linear-gptq-group{self.group_size}" if self.on_vllm_kernel else None

    def process_weights_after_loading(self, layer: Module) -> None:
        """vLLM's blocked layout (stored in the repack cache), or two layouts: PyTorch's int4
        GEMM's (few tokens) and, for dequantizing at many tokens, msModelSlim's as loaded (half a
        byte per weight more, 3% of the 21B's W4A16 bytes). The int8 copy adds a byte per weight,
        in a cache entry of its own that is memory mapped and not read ahead: a start that makes
        no call of 32 rows does not read it (the int4 entry is read ahead at every start). The
        scales are rounded to the model dtype only when repacking: 0.46 s of a warm 28-layer
        start that serves every entry (docs/notes/startup-breakdown.md)."""
        rows, loaded_scale = layer.weight.data, layer.weight_scale.data
        scale = functools.cache(lambda: loaded_scale.to(self.params_dtype))
        if self.on_vllm_kernel:

            def repack() -> dict[str, torch.Tensor]:
                blocked = vllm_int4_blocked(rows, scale().T.contiguous())
                return dict(zip(("weight", "weight_zero", "weight_scale"), blocked, strict=True))

            def copy() -> dict[str, torch.Tensor]:
                copied = int8_copy(rows, scale())
                return dict(zip(("int8_weight", "int8_scale"), copied, strict=True))

            stored = self.stored_or_repacked([rows, loaded_scale], repack)
            if self.keeps_int8_copy:
                stored |= self.stored_or_repacked(
                    [rows, loaded_scale], copy, kind="int8-copy-by-rows"
                )
            for name, tensor in stored.items():
                set_parameter(layer, name, tensor)
            return
        if self.on_avx2_kernel:
            set_parameter(layer, "weight", native_int4.avx2_layout(unpack_int4_rows(rows)))
            set_parameter(layer, "weight_scale", scale().float())
            return
        set_parameter(layer, "weight", portable_kernels.pack_int4(unpack_int4_rows(rows)))
        rounded = scale()
        set_parameter(
            layer, "weight_scale", portable_kernels.int4_scales_and_zeros(rounded, rounded.dtype)
        )
        set_parameter(layer, "weight_rows", rows)
        set_parameter(layer, "weight_group_scale", rounded)

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.on_vllm_kernel:
            out = int4_linear(
                x,
                layer.weight,
                layer.weight_zero,
                layer.weight_scale,
                getattr(layer, "int8_weight", None),
                getattr(layer, "int8_scale", None),
            )
        elif self.on_avx2_kernel:
            out = native_int4.linear(x, layer.weight, layer.weight_scale)
        else:
            out = portable_kernels.int4_group_linear(
                x, layer.weight, layer.weight_scale, layer.weight_rows, layer.weight_group_scale
            )
        return out if bias is None else out + bias
