"""The quantization method vLLM registers (``ernie-w8a8-dynamic``) and its per-layer dispatch: the
description JSON's label of a layer (or W8A8_DYNAMIC for a BF16 checkpoint quantized at load)
picks the linear or MoE method."""

import torch
from torch.nn import Module
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.platforms import current_platform

from vllm_ernie_moe import envs, layout, portable_kernels
from vllm_ernie_moe.quant.common import log_kernel_once
from vllm_ernie_moe.quant.linear import (
    ErnieW4A16LinearMethod,
    ErnieW8A8LinearMethod,
    ErnieW8A16DequantizedLinearMethod,
    ErnieW8A16LinearMethod,
)
from vllm_ernie_moe.quant.moe import (
    ErnieW4A8MoEMethod,
    ErnieW4A16MoEMethod,
    ErnieW8A8MoEMethod,
    ErnieW8A16DequantizedMoEMethod,
    ErnieW8A16MoEMethod,
)
from vllm_ernie_moe.quant.msmodelslim import (
    QUANTIZATION_NAME,
    W4A8_DYNAMIC,
    W4A16,
    W8A8_DYNAMIC,
    W8A16,
    CheckpointRules,
    ModelSlimDescription,
    QuantizationFormatError,
    find_description,
    load_description,
)

logger = init_logger(f"vllm.{__name__}")


def w8a16_int8_in_memory() -> bool:
    """Keep W8A16 weights int8 (``VLLM_ERNIE_MOE_W8A16_INT8``; default: where the portable int8
    weight-only GEMM is the faster kernel), else dequantize them at load."""
    chosen = envs.w8a16_int8_in_memory()
    return portable_kernels.bf16_gemm_is_slow() if chosen is None else chosen


def _w8a16_method(layer: Module, experts: bool):
    if w8a16_int8_in_memory():
        return ErnieW8A16MoEMethod(layer.moe_config) if experts else ErnieW8A16LinearMethod()
    log_kernel_once("W8A16", "vLLM's unquantized kernels (dequantized at load)")
    return (
        ErnieW8A16DequantizedMoEMethod(layer.moe_config)
        if experts
        else ErnieW8A16DequantizedLinearMethod()
    )


@register_quantization_config(QUANTIZATION_NAME)
class ErnieW8A8DynamicConfig(QuantizationConfig):
    """msModelSlim W8A8_DYNAMIC, W8A16, W4A8_DYNAMIC and W4A16: served from the description JSON;
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

    def checkpoint_rules(self) -> CheckpointRules:
        """Every tensor as the layout and the description say (``msmodelslim.checkpoint_rules``)."""
        return CheckpointRules(description=self.description)

    def _label(self, checkpoint_module: str) -> str:
        """The label of a vLLM module: that of its first checkpoint tensor (``load_description``
        has checked that the tensors of a fused module agree)."""
        assert self.description is not None
        return self.description.label(f"{checkpoint_module}.weight")

    def get_quant_method(self, layer: Module, prefix: str):
        if isinstance(layer, ParallelLMHead) and self.int8_lm_head:
            # Checkpoints keep the lm_head FLOAT (msModelSlim does): quantized at load. A tied
            # lm_head shares the embedding until then and gets its own int8 copy.
            return ErnieW8A8LinearMethod(prequantized=False)
        if not isinstance(layer, (LinearBase, RoutedExperts)):
            return None  # embeddings, lm_head, attention: unquantized
        prefix = layout.checkpoint_module(prefix)
        prequantized = self.description is not None
        label = (
            self._label(layout.first_checkpoint_module(prefix)) if prequantized else W8A8_DYNAMIC
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
        if label == W4A16:
            group = self.description.group_size
            return (
                ErnieW4A16MoEMethod(layer.moe_config, group, prefix)
                if experts
                else ErnieW4A16LinearMethod(group, prefix)
            )
        return UnquantizedFusedMoEMethod(layer.moe_config) if experts else UnquantizedLinearMethod()
