"""Parameter helpers shared by the linear and MoE methods."""

import functools

import torch
from torch.nn import Module, Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.parameter import ChannelQuantScaleParameter
from vllm.model_executor.utils import set_weight_attrs

from vllm_ernie_moe.quant.msmodelslim import QUANTIZATION_NAME

logger = init_logger(f"vllm.{__name__}")


def row_amax(weight: torch.Tensor, group=None) -> torch.Tensor:
    """Per-row max of ``|weight|``; over the ranks of ``group`` when each holds part of a row."""
    amax = weight.abs().amax(dim=-1, keepdim=True)
    if group is not None:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


def register_linear_scale(layer: Module, rows: int, weight_loader) -> None:
    """``weight_scale`` [out, 1] fp32 of an int8 linear, sharded with the output rows."""
    layer.register_parameter(
        "weight_scale",
        ChannelQuantScaleParameter(
            data=torch.empty(rows, 1, dtype=torch.float32),
            output_dim=0,
            weight_loader=weight_loader,
        ),
    )


def register_expert_scale(
    layer: Module,
    weight_name: str,
    experts_and_rows: tuple[int, int],
    extra_weight_attrs: dict,
    groups: int | None = None,
) -> None:
    """``<weight_name>_scale`` fp32 of quantized experts: [E, out, 1] loaded per output channel,
    or with ``groups`` [E, out, groups] per group of inputs (sharded with the inputs)."""
    scale = Parameter(
        torch.empty(*experts_and_rows, groups or 1, dtype=torch.float32), requires_grad=False
    )
    layer.register_parameter(f"{weight_name}_scale", scale)
    method = (
        FusedMoeWeightScaleSupported.CHANNEL
        if groups is None
        else FusedMoeWeightScaleSupported.GROUP
    )
    set_weight_attrs(scale, {**extra_weight_attrs, "quant_method": method.value})


def dequantize(layer: Module, weight_name: str, dtype: torch.dtype) -> None:
    """Replace int8 ``weight_name`` by ``int8 * scale`` in ``dtype`` (fp32 product, then cast) and
    drop the scale."""
    scale_name = f"{weight_name}_scale"
    weight = getattr(layer, weight_name).float() * getattr(layer, scale_name)
    set_parameter(layer, weight_name, weight.to(dtype))
    delattr(layer, scale_name)


@functools.cache
def log_kernel_once(layer_kind: str, kernel: str) -> None:
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


def set_parameter(layer: Module, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as a new parameter ``name``. Not vLLM's ``replace_parameter``: from 0.33
    on it writes into the existing Parameter, which a tied lm_head shares with the embedding."""
    setattr(layer, name, Parameter(tensor, requires_grad=False))
