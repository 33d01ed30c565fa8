"""vLLM quantization method ``ernie-w8a8-dynamic``: msModelSlim W8A8_DYNAMIC on vLLM's int8 kernels.

Two modes, one method:
- a checkpoint with a msModelSlim description JSON is served as it is (picked automatically, see
  ``patches/patch_model_config.py``); the description's label decides per tensor;
- a BF16/FP16 checkpoint with ``--quantization ernie-w8a8-dynamic`` is quantized at load with
  msModelSlim's formula (``vllm_ernie_moe.w8a8.quantize_rows``): the same int8 weights and scales.

Kernels are vLLM's own: oneDNN int8 scaled-mm for linear layers, ``CPUExpertsInt8`` for experts.
On Ascend NPUs vllm-ascend loads msModelSlim checkpoints itself (method ``ascend``): this method
refuses to run there rather than shadow it.
"""

import torch
from torch.nn import Module, Parameter
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8
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
    amax_for_moe_weight_quant,
    amax_for_tp_weight_quant,
    kInt8DynamicTokenSym,
    kInt8StaticChannelSym,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter
from vllm.model_executor.utils import replace_parameter, set_weight_attrs
from vllm.platforms import current_platform

from vllm_ernie_moe import envs
from vllm_ernie_moe.w8a8 import (
    QUANTIZATION_NAME,
    W8A8_DYNAMIC,
    ModelSlimDescription,
    QuantizationFormatError,
    find_description,
    load_description,
    quantize_rows,
)

logger = init_logger(f"vllm.{__name__}")


def _row_amax(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().amax(dim=-1, keepdim=True)


class ErnieCPUExpertsInt8(CPUExpertsInt8):
    """vLLM's int8 MoE experts, accepted for ERNIE's routing and on AVX512-VNNI CPUs.

    Upstream refuses them for "routing method Unspecified" (softmax + correction bias), but the
    experts never route: ``CPURouter`` (patched) computes the ids and weights before ``apply``,
    exactly as for ``CPUUnquantizedExperts``. Upstream also asks for AMX; the kernel's int8 path
    runs on AVX512-VNNI too (tests/test_w8a8.py compares it with a plain-PyTorch reference).
    """

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu() and torch.cpu._is_vnni_supported()

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True


@register_weight_loader_v2_supported_method
class ErnieW8A8LinearMethod(LinearMethodBase):
    """int8 per-channel weights, per-token dynamic int8 activations (oneDNN on CPU)."""

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
        self.kernel = init_int8_linear_kernel(
            is_channelwise=True,
            is_static_input_scheme=False,
            input_symmetric=True,
            module_name=type(self).__name__,
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
            layer.register_parameter(
                "weight_scale",
                ChannelQuantScaleParameter(
                    data=torch.empty(rows, 1, dtype=torch.float32),
                    output_dim=0,
                    weight_loader=weight_loader,
                ),
            )
        for unused in ("input_scale", "input_zero_point", "azp_adj"):
            layer.register_parameter(unused, None)

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            weight = layer.weight.data
            # A row-parallel shard holds part of each row: its scale needs the whole row's max.
            sharded = (
                isinstance(layer, RowParallelLinear) and get_tensor_model_parallel_world_size() > 1
            )
            amax = amax_for_tp_weight_quant(_row_amax(weight), sharded)
            quantized, scale = quantize_rows(weight, amax)
            replace_parameter(layer, "weight", quantized)
            layer.weight_scale = Parameter(scale, requires_grad=False)
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        return self.kernel.apply_weights(layer, x, bias)


class ErnieW8A8MoEMethod(FusedMoEMethodBase):
    """Routed experts in int8 (per-channel weights, per-token activations) on CPUExpertsInt8."""

    def __init__(self, moe: FusedMoEConfig, prequantized: bool) -> None:
        super().__init__(moe)
        self.prequantized = prequantized
        if not current_platform.is_cpu():
            raise QuantizationFormatError(
                f"{QUANTIZATION_NAME}: int8 experts are implemented for vLLM's CPU backend only "
                "(on Ascend, vllm-ascend serves msModelSlim checkpoints as 'ascend')."
            )
        supported, why = ErnieCPUExpertsInt8.is_supported_config(
            ErnieCPUExpertsInt8,
            moe,
            kInt8StaticChannelSym,
            kInt8DynamicTokenSym,
            FusedMoEActivationFormat.Standard,
        )
        if not supported:
            raise QuantizationFormatError(
                f"{QUANTIZATION_NAME}: vLLM's int8 CPU experts cannot run this layer ({why}); they "
                f"need hidden_size ({moe.hidden_dim}) and moe_intermediate_size per TP rank "
                f"({moe.intermediate_size_per_partition}) to be multiples of 32."
            )

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
        for name, shape in shapes.items():
            weight = Parameter(torch.empty(shape, dtype=weight_dtype), requires_grad=False)
            layer.register_parameter(name, weight)
            set_weight_attrs(weight, extra_weight_attrs)
            if self.prequantized:
                scale = Parameter(
                    torch.empty(*shape[:2], 1, dtype=torch.float32), requires_grad=False
                )
                layer.register_parameter(f"{name}_scale", scale)
                set_weight_attrs(
                    scale,
                    {
                        **extra_weight_attrs,
                        "quant_method": FusedMoeWeightScaleSupported.CHANNEL.value,
                    },
                )
        layer.w13_input_scale = None
        layer.w2_input_scale = None

    def process_weights_after_loading(self, layer: Module) -> None:
        if not self.prequantized:
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name).data
                amax = _row_amax(weight)
                if name == "w2_weight":  # down_proj shards its input: reduce the row max
                    amax = amax_for_moe_weight_quant(amax, self.moe.tp_size)
                quantized, scale = quantize_rows(weight, amax)
                replace_parameter(layer, name, quantized)
                setattr(layer, f"{name}_scale", Parameter(scale, requires_grad=False))
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = make_int8_moe_kernel(
            int8_backend=Int8MoeBackend.CPU,
            moe_quant_config=self.moe_quant_config,
            moe_config=self.moe,
            experts_cls=ErnieCPUExpertsInt8,
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


@register_quantization_config(QUANTIZATION_NAME)
class ErnieW8A8DynamicConfig(QuantizationConfig):
    """msModelSlim W8A8_DYNAMIC: served from its description JSON, or applied to BF16 at load."""

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

    def _label(self, prefix: str, checkpoint_modules: list[str]) -> str:
        """The one label of the checkpoint tensors that form vLLM module ``prefix``."""
        assert self.description is not None
        labels = {m: self.description.label(f"{m}.weight") for m in checkpoint_modules}
        if len(set(labels.values())) > 1:
            raise QuantizationFormatError(
                f"{self.description.path}: the tensors of vLLM's fused module '{prefix}' "
                f"have different labels {labels}; they run as one GEMM: label them alike."
            )
        return next(iter(labels.values()))

    def _checkpoint_modules(self, layer: Module, prefix: str) -> list[str]:
        parent, _, name = prefix.rpartition(".")
        if isinstance(layer, RoutedExperts):
            return [
                f"{prefix}.{e}.{proj}"
                for e in range(layer.global_num_experts)
                for proj in ("gate_proj", "up_proj", "down_proj")
            ]
        shards = self.packed_modules_mapping.get(name)
        return [f"{parent}.{shard}" for shard in shards] if shards else [prefix]

    def get_quant_method(self, layer: Module, prefix: str):
        if isinstance(layer, ParallelLMHead) and self.int8_lm_head:
            # Checkpoints keep the lm_head FLOAT (msModelSlim does): quantized at load. A tied
            # lm_head shares the embedding until then and gets its own int8 copy.
            return ErnieW8A8LinearMethod(prequantized=False)
        if not isinstance(layer, (LinearBase, RoutedExperts)):
            return None  # embeddings, lm_head, attention: unquantized
        prefix = prefix.removesuffix(".routed_experts")
        prequantized = self.description is not None
        quantized = not prequantized or (
            self._label(prefix, self._checkpoint_modules(layer, prefix)) == W8A8_DYNAMIC
        )
        if isinstance(layer, RoutedExperts):
            if quantized:
                return ErnieW8A8MoEMethod(layer.moe_config, prequantized)
            return UnquantizedFusedMoEMethod(layer.moe_config)
        return ErnieW8A8LinearMethod(prequantized) if quantized else UnquantizedLinearMethod()
