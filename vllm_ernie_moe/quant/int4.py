"""msModelSlim's int4 experts in the layout of vLLM's CPU int4 experts kernel (GPTQ columns, group
scales)."""

import torch
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

from vllm_ernie_moe.quant.msmodelslim import unpack_int4_rows


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
    each, read four at a time as a little-endian word: the kernel runs on x86 only), an order of
    magnitude faster than shifting int32 nibbles. One expert at a time keeps the temporaries
    small."""
    experts, half_rows, inputs = packed_rows.shape
    columns = torch.empty(experts, inputs // 8, 2 * half_rows, dtype=torch.int32)
    for expert in range(experts):
        unsigned = (unpack_int4_rows(packed_rows[expert]) + 8).to(torch.uint8)  # [out, in]
        pairs = unsigned.view(2 * half_rows, inputs // 2, 2)
        nibble_pairs = pairs[..., 0] | (pairs[..., 1] << 4)  # [out, in/2]
        columns[expert] = nibble_pairs.view(torch.int32).T  # [in/8, out]
    return columns
