"""Exact int8 and int4 GEMMs and MoE experts for CPUs without VNNI (vLLM's AVX2 and AVX-512 tiers).

Why: without VNNI, vLLM's oneDNN int8 GEMM (its W8A8 linear kernel on CPU) and ``torch._int_mm``
multiply int8 pairs through ``vpmaddubsw``, whose int16 sums saturate once a weight exceeds 64 in
magnitude; msModelSlim's weights reach 127. Measured on a Zen 5 host forced to the AVX2 and
AVX-512 tiers (``tests/test_portable_kernels.py`` keeps the check): errors of ~20% of the output
at full range, none with weights within +-64. vLLM's fused int8/int4 experts kernel
(``fused_experts_cpu``) exists only in its AVX-512 BF16 library.

How: PyTorch's weight-only kernels, vectorized for AVX2 and AVX-512 (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``), take the int8 / int4 weights as they sit in memory. For W8A8 and
W4A8 they are fed the per-token int8 activations as bf16 integers (exact below 256) with unit
weight scales, so the GEMM sums integer products, and the scales multiply in fp32 afterwards:
``y = s_x * s_w * (x_q @ w_q^T)``, the format's math. W8A16 passes the activations and the weight
scale in the model dtype, as vllm-ascend's W8A16 does on the NPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_ernie_moe import native_int4
from vllm_ernie_moe.quant.msmodelslim import unpack_int4_rows

#: Group sizes ``_weight_int4pack_mm_for_cpu`` takes (its scales are per group of inputs).
INT4_GROUP_SIZES = (256, 128, 64, 32)


def exact_int8_gemm() -> bool:
    """Whether int8 x int8 GEMMs (oneDNN, ``torch._int_mm``) are exact here: VNNI accumulates
    int8 products in int32; the AVX2 / AVX-512 path without it saturates in int16."""
    return torch.cpu._is_vnni_supported()


def bf16_gemm_is_slow() -> bool:
    """Whether this CPU's vLLM tier lacks a fast bf16 GEMM beyond batch 1: x86 tiers without
    AVX-512 BF16, where PyTorch's bf16 ``F.linear`` computes 0.04-0.06 TOP/s at 1024 tokens as
    AVX2 (docs/cpu-tiers.md "Kernel speed per tier"). There ``_weight_int8pack_mm`` (int8 weights,
    bf16 activations) beats it at every batch size, and W4A16 weights dequantized for a prefill
    run on the fp32 GEMM (:func:`int4_dequantized_linear`). The ``avx512`` tier (no BF16) and the
    experts are extrapolated; Arm keeps vLLM's bf16 kernels (not measured)."""
    from vllm_ernie_moe import cpu_tier

    tier = cpu_tier.active()
    return tier is not None and not tier.avx512_bf16


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 (``s_x = max|x_row| / 127``, round half to even), returned as
    bf16 integers (exact) and fp32 scales ``[M, 1]``."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp_(-128, 127).to(torch.bfloat16), scale


@functools.cache
def _unit_scales(rows: int) -> torch.Tensor:
    return torch.ones(rows, dtype=torch.bfloat16)


@functools.cache
def _unit_int4_scales(groups: int, rows: int) -> torch.Tensor:
    """``_weight_int4pack_mm_for_cpu``'s ``[groups, N, 2]`` (scale, zero) at scale 1, zero 0."""
    scales = torch.zeros(groups, rows, 2, dtype=torch.bfloat16)
    scales[..., 0] = 1
    return scales


def int8_gemm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quantize_input: bool
) -> torch.Tensor:
    """``x [.., K] @ dequant(weight [N, K] int8, scale [N] fp32)^T`` in ``x``'s dtype; with
    ``quantize_input`` the activations are per-token int8 first (W8A8), else as they are (W8A16)."""
    rows = x.reshape(-1, x.shape[-1])
    if quantize_input:
        x_q, x_scale = quantize_tokens(rows)
        sums = torch._weight_int8pack_mm(x_q, weight, _unit_scales(weight.shape[0]))
        out = (sums.float() * x_scale * scale).to(x.dtype)
    else:
        out = torch._weight_int8pack_mm(rows, weight, scale.to(rows.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("vllm_ernie_moe::portable_int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quantize_input: bool
) -> torch.Tensor:
    """:func:`int8_gemm` as one op for torch.compile (vLLM's default mode on CPU): Inductor
    (torch 2.13) cannot lower ``_weight_int8pack_mm`` on a computed input such as the unit
    scales (``LoweringException``, found by tests/test_w8a8.py's compiled engine as AVX2)."""
    return int8_gemm(x, weight, scale, quantize_input)


@int8_linear.register_fake
def _int8_linear_shape(x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def int4_group_size(inputs: int) -> int:
    return next(g for g in INT4_GROUP_SIZES if inputs % g == 0)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int4 values in [-8, 7] ``[N, K]`` -> ``_weight_int4pack_mm_for_cpu``'s ``[N, K/2]`` uint8."""
    return torch._convert_weight_to_int4pack_for_cpu((values + 8).to(torch.int32), 1)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W4A8: per-token int8 ``x [M, K]`` times int4 ``packed`` (:func:`pack_int4`) with per-channel
    ``scale [N]`` fp32, in fp32."""
    rows, inputs = packed.shape[0], x.shape[-1]
    group = int4_group_size(inputs)
    x_q, x_scale = quantize_tokens(x)
    sums = torch._weight_int4pack_mm_for_cpu(
        x_q, packed, group, _unit_int4_scales(inputs // group, rows)
    )
    return sums.float() * x_scale * scale


def int4_scales_and_zeros(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Group scales ``[..., N, K / group]`` as ``_weight_int4pack_mm_for_cpu``'s ``[..., K / group,
    N, 2]`` (scale, zero) in ``dtype``; zero 0: symmetric."""
    scale = scale.transpose(-1, -2).to(dtype)
    return torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()


def int4_group_gemm(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """W4A16: ``x [.., K]`` in the model dtype times int4 ``packed`` (:func:`pack_int4`) with
    group scales (:func:`int4_scales_and_zeros`), in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(scales_and_zeros.dtype)
    group = x.shape[-1] // scales_and_zeros.shape[0]
    out = torch._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


#: Output rows dequantized at a time: the temporaries of a chunk stay in the L2 cache; whole
#: weights at once took several times longer (the 21B's qkv_proj and dense down_proj, Zen 4).
DEQUANTIZE_ROWS_PER_CHUNK = 256


def dequantize_int4_rows(
    rows: torch.Tensor, scale: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """msModelSlim's int4 pairs ``[N/2, K]`` times group scales ``[N, K / group]`` into ``out``
    (``[N, K]``): each weight is ``value * scale`` rounded once in the scales' dtype, as a bf16
    checkpoint would hold it, whatever ``out``'s dtype."""
    outputs, groups = scale.shape
    for start in range(0, outputs, DEQUANTIZE_ROWS_PER_CHUNK):
        values = unpack_int4_rows(rows[start // 2 : (start + DEQUANTIZE_ROWS_PER_CHUNK) // 2])
        chunk = values.shape[0]
        grouped = out[start : start + chunk].view(chunk, groups, -1)
        torch.mul(
            values.view(chunk, groups, -1), scale[start : start + chunk, :, None], out=grouped
        )
    return out


_scratch: dict[torch.dtype, torch.Tensor] = {}


def scratch_weight(dtype: torch.dtype, rows: int, columns: int) -> torch.Tensor:
    """A ``[rows, columns]`` view of one buffer per dtype kept for the process, for weights made
    per call: allocating them afresh each call cost more than making them (page faults of tens of
    MB per call)."""
    buffer = _scratch.get(dtype)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = _scratch[dtype] = torch.empty(rows * columns, dtype=dtype)
    return buffer[: rows * columns].view(rows, columns)


def dequantized_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM dtype for weights dequantized for ``dtype`` activations: fp32 for bf16 where
    :func:`bf16_gemm_is_slow` (several times faster on AVX2: benchmarks/int4_linear.py,
    docs/cpu-tiers.md), else ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 and bf16_gemm_is_slow() else dtype


def int4_dequantized_linear(
    x: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor, gemm_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x @ W^T``, ``W`` dequantized (:func:`dequantize_int4_rows`) into a
    :func:`scratch_weight`. On the GEMM of ``gemm_dtype`` (default
    :func:`dequantized_gemm_dtype`); an fp32 GEMM gets the same bf16 weights, widened, and sums in
    fp32 as the bf16 one does."""
    gemm_dtype = gemm_dtype or dequantized_gemm_dtype(x.dtype)
    weight = scratch_weight(gemm_dtype, scale.shape[0], rows.shape[1])
    dequantize_int4_rows(rows, scale.to(x.dtype), weight)
    return F.linear(x.to(gemm_dtype), weight).to(x.dtype)


#: From this many tokens on, a W4A16 linear dequantizes its weight and runs a GEMM on it
#: (:func:`dequantized_gemm_dtype`): PyTorch's int4 GEMM computes at a fraction of that GEMM's
#: rate, so once the weight bytes stop deciding the time, dequantizing once per call wins
#: (benchmarks/int4_linear.py, docs/w8a8.md).
INT4_DEQUANTIZE_FROM_TOKENS = 128


@torch.library.custom_op("vllm_ernie_moe::int4_group_linear", mutates_args=())
def int4_group_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    rows: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """A W4A16 linear as one op for torch.compile, like :func:`int8_linear`: below
    :data:`INT4_DEQUANTIZE_FROM_TOKENS` tokens :func:`int4_group_gemm` on ``packed``, from there
    on :func:`int4_dequantized_linear` on ``rows`` and ``scale``."""
    if x.numel() // x.shape[-1] < INT4_DEQUANTIZE_FROM_TOKENS:
        return int4_group_gemm(x, packed, scales_and_zeros)
    return int4_dequantized_linear(x, rows, scale)


@int4_group_linear.register_fake
def _int4_group_linear_shape(x: torch.Tensor, packed, scales_and_zeros, rows, scale):
    return x.new_empty(*x.shape[:-1], scales_and_zeros.shape[1])


#: From this many tokens on, a bf16 linear where :func:`bf16_gemm_is_slow` widens its weight to
#: fp32 and runs the fp32 GEMM (:func:`bf16_linear`): 1.12-1.82x faster at 8 tokens, 0.88-1.17x
#: at 4, 0.20-0.66x at 1, where PyTorch's bf16 GEMM just streams the weight (Zen 3,
#: benchmarks/bf16_widening.py: docs/results/bf16-widening-avx2-zen3.json).
BF16_WIDEN_FROM_TOKENS = 8


#: Weight rows widened at a time: a block is still in the L2 cache when its GEMM reads it. The
#: whole weight widened at once took 1.61-3.22x the time at 32 tokens, 0.85-1.37x at 1024 (Zen 3:
#: docs/results/bf16-widening-blocks-avx2-zen3.txt), and its buffer was large (the lm_head's: 1 GB).
WIDEN_ROWS_PER_BLOCK = 256


def blocked_fp32_linear(
    x: torch.Tensor,
    outputs: int,
    fill: Callable[[torch.Tensor, int], object],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T`` (+ ``bias``) on the fp32 GEMM, the fp32 weight ``W [outputs, K]`` made
    :data:`WIDEN_ROWS_PER_BLOCK` rows at a time by ``fill(block, first_row)`` into a
    :func:`scratch_weight`; each block's GEMM writes its rows of the transposed output, rounded
    to ``x``'s dtype once at the end."""
    inputs = x.reshape(-1, x.shape[-1]).float()
    transposed = torch.empty(outputs, inputs.shape[0])
    block = scratch_weight(torch.float32, WIDEN_ROWS_PER_BLOCK, inputs.shape[1])
    for start in range(0, outputs, WIDEN_ROWS_PER_BLOCK):
        rows = block[: min(WIDEN_ROWS_PER_BLOCK, outputs - start)]
        fill(rows, start)
        torch.mm(rows, inputs.t(), out=transposed[start : start + rows.shape[0]])
    if bias is not None:
        transposed += bias.float()[:, None]
    out = torch.empty(inputs.shape[0], outputs, dtype=x.dtype).copy_(transposed.t())
    return out.view(*x.shape[:-1], outputs)


def widened_bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` of bf16 operands on the fp32 GEMM, the weight widened (exactly) a block of
    rows at a time (:func:`blocked_fp32_linear`): fp32 sums as the bf16 GEMM's, the output rounded
    to bf16 once, as there."""

    def widen(block: torch.Tensor, start: int) -> None:
        block.copy_(weight[start : start + block.shape[0]])

    return blocked_fp32_linear(x, weight.shape[0], widen, bias)


@torch.library.custom_op("vllm_ernie_moe::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for bf16 weights on a tier whose bf16 GEMM is slow: from
    :data:`BF16_WIDEN_FROM_TOKENS` tokens :func:`widened_bf16_linear`. One op for torch.compile:
    the choice depends on the size."""
    if x.numel() // x.shape[-1] < BF16_WIDEN_FROM_TOKENS:
        return F.linear(x, weight, bias)
    return widened_bf16_linear(x, weight, bias)


@bf16_linear.register_fake
def _bf16_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def run_experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gemm,
) -> torch.Tensor:
    """SwiGLU experts as one GEMM pair per expert that has tokens, weighted and summed in fp32.

    ``gemm(expert, which, x)`` with ``which`` 0 (gate/up: ``[n, 2I]``) or 1 (down: ``[n, H]``)."""
    top_k = topk_ids.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].float().unsqueeze(-1)
    counts = torch.bincount(flat_ids, minlength=int(flat_ids.max()) + 1).tolist()
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        gate, up = gemm(expert, 0, hidden[rows]).float().chunk(2, dim=-1)
        down = gemm(expert, 1, F.silu(gate) * up)
        out.index_add_(0, rows, down.float() * weights[start : start + count])
        start += count
    return out.to(hidden.dtype)


#: Expert weight formats :func:`experts` runs: int8 weights with int8 or model-dtype activations,
#: int4 weights (``pack_int4``) with int8 activations (per-channel scales) or model-dtype ones
#: (W4A16: the scales as :func:`int4_scales_and_zeros`), or W4A16 on the AVX2 kernel
#: (``native_int4.avx2_layout``, fp32 group scales).
EXPERT_FORMATS = ("w8a8", "w8a16", "w4a8", "w4a16", "w4a16-avx2")


@torch.library.custom_op("vllm_ernie_moe::portable_experts", mutates_args=())
def experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    weight_format: str,
) -> torch.Tensor:
    """:func:`run_experts` on quantized ``[E, out, in]`` weights with their scales.

    A custom op, so torch.compile (vLLM's default mode on CPU) sees one opaque call: the loop
    over experts depends on the routing (data-dependent sizes, which Dynamo refuses)."""
    weights, scales = (w13, w2), (w13_scale, w2_scale)

    def gemm(expert: int, which: int, x: torch.Tensor) -> torch.Tensor:
        weight, scale = weights[which][expert], scales[which][expert]
        if weight_format == "w4a16":
            return int4_group_gemm(x.to(hidden.dtype), weight, scale)
        if weight_format == "w4a16-avx2":
            return native_int4.matmul(x.to(hidden.dtype), weight, scale)
        scale = scale.view(-1)
        if weight_format == "w4a8":
            return int4_gemm(x, weight, scale)
        if weight_format == "w8a16":
            x = x.to(hidden.dtype)  # run_experts hands the down GEMM fp32
        return int8_gemm(x, weight, scale, quantize_input=weight_format == "w8a8")

    return run_experts(hidden, topk_weights, topk_ids, gemm)


@experts.register_fake
def _experts_shape(hidden: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(hidden)
