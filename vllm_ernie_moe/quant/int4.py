"""msModelSlim's int4 weights in the layout of vLLM's CPU int4 kernels (GPTQ columns, group scales,
blocked): its fused experts and its linear ``int4_scaled_mm_cpu``."""

import torch
from vllm._custom_ops import CPUQuantAlgo, convert_weight_packed_scale_zp
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


#: Output channels per block of vLLM's int4 layout: a weight's outputs must be a multiple.
VLLM_INT4_OUTPUT_BLOCK = 32
#: GPTQ's symmetric zero point as vLLM's int4 kernels read it (they add 1 to each nibble: 7 -> 8).
_GPTQ_ZERO_WORD = 0x77777777


def vllm_int4_blocked(
    packed_rows: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """msModelSlim's ``[..., out/2, in]`` int4 rows and ``[..., in/group, out]`` scales as vLLM's
    int4 kernels take them: (weight, zeros, scales), blocked by ``convert_weight_packed_scale_zp``.
    No leading dimension: a linear's; one: experts'."""
    columns = gptq_int4_columns(packed_rows.reshape(-1, *packed_rows.shape[-2:]))
    columns = columns.view(*packed_rows.shape[:-2], *columns.shape[-2:])
    zeros = torch.full(
        (*scales.shape[:-1], scales.shape[-1] // 8), _GPTQ_ZERO_WORD, dtype=torch.int32
    )
    return convert_weight_packed_scale_zp(columns, zeros, scales, CPUQuantAlgo.GPTQ)


#: Most rows per call of vLLM's int4 linear below :data:`_INT4_LINEAR_SPLIT_BELOW`: a call of 5
#: rows takes 1.85-3.0x one of 4, so 5-31 rows run faster as calls of 4 (docs/w8a8.md).
_INT4_LINEAR_ROWS_PER_CALL = 4
#: From here on one call: each call reads the whole weight again, and by 64 rows calls of 4 were
#: slower than one (docs/results/kernel-experiments-zen4.txt).
_INT4_LINEAR_SPLIT_BELOW = 32

_library = torch.library.Library("vllm_ernie_moe", "FRAGMENT")
_library.define(
    "int4_linear(Tensor x, Tensor weight, Tensor zeros, Tensor scales) -> Tensor",
    tags=torch.Tag.pt2_compliant_tag,
)


def _int4_linear(
    x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """vLLM's int4 linear ``int4_scaled_mm_cpu`` on ``x [M, K]``, 5-31 rows as calls of 4: the
    same numbers (each row is quantized and summed on its own), a MoE layer's linears 1.34x faster
    at 8 rows (a batch-8 decode step).

    An op, so that the branch on the row count is taken at run time, not once while torch.compile
    traces. Registered through ``torch.library.Library``: ``custom_op``'s wrapper added 8-9 us a
    call here, and a 28-layer step makes 112 calls."""
    rows = x.shape[0]
    if _INT4_LINEAR_ROWS_PER_CALL < rows < _INT4_LINEAR_SPLIT_BELOW:
        return torch.cat(
            [
                torch.ops._C.int4_scaled_mm_cpu(part, weight, zeros, scales, None)
                for part in x.split(_INT4_LINEAR_ROWS_PER_CALL)
            ]
        )
    return torch.ops._C.int4_scaled_mm_cpu(x, weight, zeros, scales, None)


_library.impl("int4_linear", _int4_linear, "CPU")


@torch.library.register_fake("vllm_ernie_moe::int4_linear")
def _int4_linear_shape(
    x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0] * scales.shape[-1])


def int4_linear(
    x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """``x [..., K]`` times a weight in :func:`vllm_int4_blocked`'s layout, through the op
    ``vllm_ernie_moe::int4_linear``."""
    out = torch.ops.vllm_ernie_moe.int4_linear(x.reshape(-1, x.shape[-1]), weight, zeros, scales)
    return out.view(*x.shape[:-1], out.shape[-1])
