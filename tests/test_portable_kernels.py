"""The portable int8/int4 GEMMs and experts (CPUs without VNNI) against integer math in float64,
and the saturation of vLLM's oneDNN int8 GEMM without VNNI that they exist for.

Every test states the tier it ran on (``VLLM_ERNIE_MOE_CPU_TIER``; ``make test CPU_TIER=avx2``).
"""

import pytest
import torch
from reference import group_quantizer

from vllm_ernie_moe import cpu_tier, native_int4, portable_kernels
from vllm_ernie_moe.portable_kernels import int4_dequantized_linear
from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

TIER = cpu_tier.active()


@pytest.fixture(autouse=True)
def report_tier(record_property):
    record_property("cpu_tier", TIER.name if TIER else "other")


def full_range_weights(rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """msModelSlim-like int8 rows (each reaching +-127) and fp32 per-channel scales."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8)
    weight[:, 0] = 127
    return weight, torch.rand(rows, generator=generator) * 0.01 + 1e-3


def reference_w8a8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token int8 activations times int8 weights, in float64."""
    x64 = x.double()
    x_scale = x64.abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x64 / x_scale).clamp(-128, 127)
    return (x_q @ weight.double().T) * x_scale * scale.double()


@pytest.mark.parametrize("rows_in", [1, 8, 67])
def test_int8_gemm_is_the_w8a8_math(rows_in):
    weight, scale = full_range_weights(96, 256)
    x = torch.randn(rows_in, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = portable_kernels.int8_gemm(x, weight, scale, quantize_input=True)
    want = reference_w8a8(x, weight, scale)
    assert got.dtype == torch.bfloat16
    # bf16 output: within 2^-7 of the largest value (two roundings).
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-7


def test_int8_gemm_w8a16_uses_scales_in_the_model_dtype():
    weight, scale = full_range_weights(64, 128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = portable_kernels.int8_gemm(x, weight, scale, quantize_input=False)
    want = x.double() @ (weight.double() * scale.bfloat16().double()[:, None]).T
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-7


def test_int4_gemm_is_the_w4a8_math():
    generator = torch.Generator().manual_seed(3)
    values = torch.randint(-8, 8, (64, 256), generator=generator, dtype=torch.int8)
    scale = torch.rand(64, generator=generator) + 0.1
    x = torch.randn(9, 256, generator=generator)
    got = portable_kernels.int4_gemm(x, portable_kernels.pack_int4(values), scale)
    want = reference_w8a8(x, values, scale)
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-7


def test_run_experts_is_a_weighted_sum_of_swiglu_experts():
    generator = torch.Generator().manual_seed(4)
    experts, hidden, inter, tokens, top_k = 4, 32, 16, 6, 2
    w13 = torch.randn(experts, 2 * inter, hidden, generator=generator)
    w2 = torch.randn(experts, hidden, inter, generator=generator)
    x = torch.randn(tokens, hidden, generator=generator)
    topk_ids = torch.tensor([[0, 3], [3, 1], [1, 0], [2, 3], [3, 0], [1, 2]])
    topk_weights = torch.rand(tokens, top_k, generator=generator)

    def gemm(expert, which, rows):
        return rows.float() @ (w13, w2)[which][expert].T

    got = portable_kernels.run_experts(x, topk_weights, topk_ids, gemm)
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            e = topk_ids[t, k]
            gate, up = (x[t] @ w13[e].T).chunk(2)
            want[t] += topk_weights[t, k] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "w8a16"])
def test_int8_linear_compiles_with_inductor(quantize_input):
    """vLLM compiles the model with Inductor on CPU, which cannot lower ``_weight_int8pack_mm`` on
    computed inputs: the linear must reach it as one op, fed by fused pointwise code."""
    weight, scale = full_range_weights(48, 64, seed=3)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(7)).bfloat16()

    def layer(x):
        return portable_kernels.int8_linear(x * 2 + 1, weight, scale, quantize_input)

    got = torch.compile(layer, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "tokens",
    [
        portable_kernels.INT4_DEQUANTIZE_FROM_TOKENS - 1,
        portable_kernels.INT4_DEQUANTIZE_FROM_TOKENS,
    ],
    ids=["int4-gemm", "dequantized"],
)
def test_int4_group_linear_compiles_with_inductor_and_matches_group_math(tokens, monkeypatch):
    """The W4A16 linear as one op under Inductor, on both of its paths (PyTorch's int4 GEMM; from
    ``INT4_DEQUANTIZE_FROM_TOKENS`` on, bf16 weights dequantized chunk by chunk: 592 rows cross
    the chunk size), against int4 values times their group's scale (float64; scales as the kernel
    holds them, in bf16)."""
    generator = torch.Generator().manual_seed(8)
    values = torch.randint(-8, 8, (592, 64), generator=generator, dtype=torch.int8)
    scale = (torch.rand(592, 2, generator=generator) * 0.01 + 1e-3).bfloat16()  # groups of 32
    packed = portable_kernels.pack_int4(values)
    scales = portable_kernels.int4_scales_and_zeros(scale, torch.bfloat16)
    rows = pack_int4_rows(values)
    x = torch.randn(tokens, 64, generator=generator).bfloat16()

    def layer(x):
        return portable_kernels.int4_group_linear(x * 2 + 1, packed, scales, rows, scale)

    dequantized = []
    monkeypatch.setattr(
        portable_kernels,
        "int4_dequantized_linear",
        lambda *args: dequantized.append(1) or int4_dequantized_linear(*args),
    )
    got = torch.compile(layer, fullgraph=True, backend="inductor")(x)
    assert bool(dequantized) == (tokens >= portable_kernels.INT4_DEQUANTIZE_FROM_TOKENS)
    inputs = (x * 2 + 1).double()
    want = inputs @ (values.double() * scale.double().repeat_interleave(32, dim=1)).T
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-7


@pytest.mark.parametrize("gemm_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int4_dequantized_linear_runs_the_bf16_checkpoint_weights(gemm_dtype):
    """A prefill-sized W4A16 linear on either GEMM (fp32 where the tier's bf16 GEMM is slow: AVX2)
    uses the weights a bf16 checkpoint would hold: each int4 value times its group's scale,
    rounded once to bf16 (float64 products rounded here), widened exactly for the fp32 GEMM."""
    generator = torch.Generator().manual_seed(9)
    values = torch.randint(-8, 8, (600, 64), generator=generator, dtype=torch.int8)
    scale = (torch.rand(600, 2, generator=generator) * 0.01 + 1e-3).bfloat16()  # groups of 32
    weights = (values.double() * scale.double().repeat_interleave(32, dim=1)).bfloat16()
    rows = pack_int4_rows(values)
    for dtype in (torch.bfloat16, torch.float32):
        out = portable_kernels.dequantize_int4_rows(rows, scale, torch.empty(600, 64, dtype=dtype))
        assert torch.equal(out, weights.to(dtype))
    x = torch.randn(130, 64, generator=generator).bfloat16()
    got = int4_dequantized_linear(x, rows, scale, gemm_dtype)
    want = x.double() @ weights.double().T
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-8


@pytest.mark.parametrize("weight_format", portable_kernels.EXPERT_FORMATS)
def test_experts_op_compiles_whole_and_matches_integer_math(weight_format):
    """vLLM compiles the model on CPU (fullgraph): the experts' routing-dependent loop must be one
    opaque op there, and the op must compute each format's math (float64 reference). W4A16: a
    scale per group of 32 inputs, activations unquantized; on the AVX2 kernel, activations int8
    per group of 32."""
    avx2 = weight_format == "w4a16-avx2"
    if avx2 and native_int4.kernels() is None:
        pytest.skip("the AVX2 kernel did not build here")
    generator = torch.Generator().manual_seed(6)
    experts, hidden, inter, tokens, group = 3, 64, 64, 5, 32
    int4 = weight_format.startswith(("w4a8", "w4a16"))
    group_scaled = weight_format.startswith("w4a16")
    w13, s13 = full_range_weights(experts * 2 * inter, hidden, seed=1)
    w2, s2 = full_range_weights(experts * hidden, inter, seed=2)
    if int4:
        w13, w2 = w13.clamp(-8, 7), w2.clamp(-8, 7)
    w13, w2 = w13.view(experts, 2 * inter, hidden), w2.view(experts, hidden, inter)
    s13, s2 = s13.view(experts, 2 * inter, 1), s2.view(experts, hidden, 1)
    if group_scaled:  # per-group scales, as the kernel holds them (bf16)
        s13 = s13 * torch.rand(experts, 2 * inter, hidden // group, generator=generator)
        s2 = s2 * torch.rand(experts, hidden, inter // group, generator=generator)
        s13, s2 = s13.bfloat16(), s2.bfloat16()
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    topk_ids = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 0], [0, 1]])
    topk_weights = torch.rand(tokens, 2, generator=generator)

    def reference(rows, weight, scale):
        if avx2:
            rows = group_quantizer(group)(rows.double())
        if weight_format in ("w8a16", "w4a16", "w4a16-avx2"):
            per_weight = scale.double().repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
            return rows.double() @ (weight.double() * per_weight).T
        return reference_w8a8(rows, weight, scale.view(-1))

    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for k in range(2):
            e = topk_ids[t, k]
            gate, up = reference(x[t : t + 1], w13[e], s13[e]).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            want[t] += topk_weights[t, k].double() * reference(act, w2[e], s2[e])[0]

    if avx2:
        w13, w2 = native_int4.avx2_layout(w13), native_int4.avx2_layout(w2)
        s13, s2 = s13.float(), s2.float()
    elif int4:
        w13 = torch.stack([portable_kernels.pack_int4(w) for w in w13])
        w2 = torch.stack([portable_kernels.pack_int4(w) for w in w2])
    if weight_format == "w4a16":
        s13, s2 = (portable_kernels.int4_scales_and_zeros(s, torch.bfloat16) for s in (s13, s2))

    def layer(x, topk_weights, topk_ids):
        return portable_kernels.experts(x, topk_weights, topk_ids, w13, w2, s13, s2, weight_format)

    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
    got = compiled(x, topk_weights, topk_ids)
    assert got.dtype == x.dtype
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-6


@pytest.mark.skipif(
    portable_kernels.exact_int8_gemm(), reason="this tier has VNNI: vLLM's int8 GEMM is exact"
)
def test_vllm_onednn_int8_gemm_saturates_without_vnni():
    """Why the portable kernels exist: vLLM's oneDNN int8 GEMM on this tier is wrong for
    full-range weights and right for weights within +-64. If this fails, upstream fixed it."""
    import vllm._custom_ops as ops

    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    errors = []
    for limit in (127, 64):
        weight, scale = full_range_weights(64, 256)
        weight = weight.clamp(-limit, limit)
        handler = ops.create_onednn_scaled_mm(
            weight.t(), scale[:, None], torch.bfloat16, True, False
        )
        x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty(5, 64, dtype=torch.bfloat16)
        ops.onednn_scaled_mm(handler, x_q, out, x_scale, None, None, None)
        want = (x_q.double() * x_scale.double()) @ (weight.double() * scale.double()[:, None]).T
        errors.append(((out.double() - want).abs().max() / want.abs().max()).item())
    assert errors[0] > 0.05, f"full range: {errors[0]:.4f} of the output"
    assert errors[1] < 0.01, f"within +-64: {errors[1]:.4f} of the output"
