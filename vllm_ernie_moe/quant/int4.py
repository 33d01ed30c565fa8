"""msModelSlim's int4 weights in the layout of vLLM's CPU int4 kernels (GPTQ columns, group scales,
blocked): its fused experts and its linear ``int4_scaled_mm_cpu``."""

import torch
from vllm._custom_ops import CPUQuantAlgo, convert_weight_packed_scale_zp
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

from vllm_ernie_moe.patches.patch_cpu_sgl_kernels import sgl_kernel_fits
from vllm_ernie_moe.quant.msmodelslim import dequantized_weight, unpack_int4_rows


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
#: slower than one (docs/results/kernel-experiments-zen4.txt). From here on too, the int8 copy
#: (:func:`int8_copy`) where the layer keeps one: 2.05x the int4 kernel's speed at 32 rows, 1.70x at
#: 1024 on a MoE layer's linears. Not below: the brief warm-up's 16-token forward would read every
#: copy at start (docs/w8a8.md).
_INT4_LINEAR_SPLIT_BELOW = 32

_library = torch.library.Library("vllm_ernie_moe", "FRAGMENT")
_library.define(
    "int4_linear(Tensor x, Tensor weight, Tensor zeros, Tensor scales, Tensor? int8_weight, "
    "Tensor? int8_scales) -> Tensor",
    tags=torch.Tag.pt2_compliant_tag,
)


def _int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    int8_weight: torch.Tensor | None,
    int8_scales: torch.Tensor | None,
) -> torch.Tensor:
    """vLLM's int4 linear ``int4_scaled_mm_cpu`` on ``x [M, K]``, 5-31 rows as calls of 4: the
    same numbers (each row is quantized and summed on its own), a MoE layer's linears 1.34x faster
    at 8 rows (a batch-8 decode step). 32 rows or more on vLLM's int8 GEMM where an int8 copy is
    given.

    An op, so that the branch on the row count is taken at run time, not once while torch.compile
    traces. Registered through ``torch.library.Library``: ``custom_op``'s wrapper added 8-9 us a
    call here, and a 28-layer step makes 112 calls."""
    rows = x.shape[0]
    if rows >= _INT4_LINEAR_SPLIT_BELOW and int8_weight is not None:
        return sgl_int8_linear(x, int8_weight, int8_scales)
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
    x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, *_
) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0] * scales.shape[-1])


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    int8_weight: torch.Tensor | None = None,
    int8_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K]`` times a weight in :func:`vllm_int4_blocked`'s layout (and, optionally, its
    :func:`int8_copy` for many rows), through the op ``vllm_ernie_moe::int4_linear``."""
    out = torch.ops.vllm_ernie_moe.int4_linear(
        x.reshape(-1, x.shape[-1]), weight, zeros, scales, int8_weight, int8_scales
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def int8_copy_fits(rows: int, inputs: int) -> bool:
    """vLLM's int8 GEMM (sgl-kernel's ``int8_scaled_mm_with_quant``) is in this build and takes
    a ``[rows, inputs]`` weight (its layout rule, as the sgl kernel patch applies it)."""
    return hasattr(torch.ops._C, "int8_scaled_mm_with_quant") and sgl_kernel_fits(
        rows, inputs, torch.int8
    )


def sgl_int8_packed(weight: torch.Tensor) -> torch.Tensor:
    """An int8 ``[rows, inputs]`` weight in the layout of vLLM's int8 GEMM (VNNI blocks with
    their compensation), for :func:`sgl_int8_linear`."""
    return torch.ops._C.convert_weight_packed(weight)


def sgl_int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (activations quantized per token inside) times a :func:`sgl_int8_packed` weight with
    fp32 per-row ``scales``."""
    return torch.ops._C.int8_scaled_mm_with_quant(x, weight, scales, None, x.dtype, True)


def int8_copy(packed_rows: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """msModelSlim's int4 rows ``[out/2, in]`` with their group scales ``[out, in/group]`` (as the
    int4 kernel gets them) as one int8 weight per output row, packed for vLLM's int8 GEMM:
    (weight, fp32 scales ``[out]``). A row's step is a 16th of its widest group's scale, so that
    group's values are exact (16 times the int4 value fits int8) and the other groups' move by
    at most half that step: exact wherever a row's groups share a scale."""
    row_scales = scales.float().amax(dim=1) / 16
    weight = dequantized_weight(packed_rows, scales) / row_scales[:, None]
    return sgl_int8_packed(torch.round(weight).to(torch.int8)), row_scales
