"""The plugin's AVX2 W4A16 kernel (``vllm_ernie_moe/native_int4.py``, ``csrc/int4_avx2.cpp``)
against float64 math: its layout, its int8-per-group GEMM, its dequantization, the op on both
paths under Inductor, the W4A16 linear method on it, and a failed build leaving the portable
kernels in place. The engine on it: tests/test_w4a16.py."""

import pytest
import torch
from reference import int8_rows

from vllm_ernie_moe import native_int4
from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

pytestmark = pytest.mark.skipif(
    native_int4.kernels() is None, reason="the AVX2 kernel did not build here (no x86 AVX2?)"
)


def int4_weight(outputs: int, inputs: int, group: int, seed: int):
    """Random int4 values (every row reaching -8 and 7) and bf16-valued group scales in fp32."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (outputs, inputs), generator=generator, dtype=torch.int8)
    values[:, 0], values[:, -1] = -8, 7
    scale = (torch.rand(outputs, inputs // group, generator=generator) * 0.01 + 1e-3).bfloat16()
    return values, scale.float()


def group_scaled(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    group = values.shape[1] // scale.shape[1]
    return values.double() * scale.double().repeat_interleave(group, dim=1)


def test_layout_is_the_documented_nibble_order():
    """Byte ``i`` of a row's 64-input chunk: input ``i`` + 8 in its low nibble, ``i + 32`` + 8 in
    its high one (read here byte by byte)."""
    values, _ = int4_weight(3, 128, 32, seed=0)
    packed = native_int4.avx2_layout(values)
    assert packed.shape == (3, 64) and packed.dtype == torch.uint8
    for row in range(3):
        for chunk in range(2):
            for i in range(32):
                byte = int(packed[row, chunk * 32 + i])
                assert byte & 15 == int(values[row, chunk * 64 + i]) + 8
                assert byte >> 4 == int(values[row, chunk * 64 + 32 + i]) + 8


@pytest.mark.parametrize("group", native_int4.GROUP_SIZES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int4_gemm_is_int8_per_group_activations_times_int4(group, rows, dtype):
    """Activations int8 per group (scale max|x| / 127, round half to even), times the int4 values
    and both scales: float64 math, to fp32 rounding. Rows 1-9 cover the kernel's blocks of 4 and
    their tails; an outlier per group makes per-group and per-token steps differ."""
    values, scale = int4_weight(80, 256, group, seed=group + rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    x[:, ::group] *= 30
    got = native_int4.kernels().int4_gemm(x, native_int4.avx2_layout(values), scale)
    quantized, x_scale = int8_rows(x.float().unflatten(-1, (-1, group)))
    want = (quantized.double() * x_scale.double()).flatten(-2) @ group_scaled(values, scale).T
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= want.abs().max() * 1e-5
    per_token, token_scale = int8_rows(x.double())
    other = (per_token * token_scale) @ group_scaled(values, scale).T
    assert (other - want).abs().max() > 100 * (got.double() - want).abs().max()


@pytest.mark.parametrize("round_bf16", [True, False])
def test_dequantize_is_value_times_scale(round_bf16):
    """Rows ``first..`` of the weight as value x scale: rounded once to bf16 (as a bf16 checkpoint
    holds the product), or exact in fp32."""
    values, scale = int4_weight(40, 128, 64, seed=5)
    out = torch.empty(30, 128)
    native_int4.kernels().dequantize_int4(
        native_int4.avx2_layout(values), scale, 10, out, round_bf16
    )
    want = group_scaled(values, scale)[10:]
    assert torch.equal(out, (want.bfloat16() if round_bf16 else want).float())


@pytest.mark.parametrize(
    "tokens",
    [native_int4.DEQUANTIZE_FROM_ROWS - 1, native_int4.DEQUANTIZE_FROM_ROWS],
    ids=["int8-activations", "dequantized"],
)
def test_linear_op_compiles_with_inductor_on_both_paths(tokens):
    """The op under Inductor (vLLM compiles the model on CPU): below ``DEQUANTIZE_FROM_ROWS`` rows
    int8 activations per group, from there the fp32 GEMM on bf16-rounded weights dequantized in
    blocks (300 outputs cross the block size), W4A16's math (float64 reference)."""
    values, scale = int4_weight(300, 128, 32, seed=7)
    weight = native_int4.avx2_layout(values)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1)).bfloat16()

    def layer(x):
        return native_int4.linear(x * 2, weight, scale)

    got = torch.compile(layer, fullgraph=True, backend="inductor")(x)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 300)
    want = (x * 2).double() @ group_scaled(values, scale).bfloat16().double().T
    error = (got.double() - want).abs().max() / want.abs().max()
    if tokens < native_int4.DEQUANTIZE_FROM_ROWS:
        assert 2**-9 < error < 2**-5  # int8 activations: off W4A16's math by their rounding
    else:
        assert error <= 2**-8


def test_bad_shapes_are_named():
    packed, scale = torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 3)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        native_int4.kernels().int4_gemm(torch.randn(1, 96), packed, scale)
    with pytest.raises(RuntimeError, match="uint8"):
        native_int4.kernels().int4_gemm(torch.randn(1, 96), packed.char(), scale)


def test_w4a16_linear_method_serves_on_it_when_asked(monkeypatch):
    """``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=1`` where vLLM's int4 kernels do not serve W4A16: the
    method keeps the AVX2 layout and its output is the kernel's math; off, it stays portable."""
    from torch.nn import Module
    from vllm.model_executor import parameter

    from vllm_ernie_moe.quant import linear

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(linear, "vllm_kernel_serves", lambda weight_format: False)
    values, scale = int4_weight(96, 256, 32, seed=3)
    for enabled in (False, True):
        monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL", str(int(enabled)))
        method = linear.ErnieW4A16LinearMethod(32, "model.layers.0.self_attn.o_proj")
        layer = Module()
        method.create_weights(layer, 256, [96], 256, 96, torch.bfloat16, weight_loader=lambda *a: 0)
        assert method.on_avx2_kernel == enabled
        layer.weight.data.copy_(pack_int4_rows(values))
        layer.weight_scale.data.copy_(scale)
        method.process_weights_after_loading(layer)
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
        got = method.apply(layer, x)
        if enabled:
            assert layer.weight.dtype == torch.uint8 and not hasattr(layer, "weight_rows")
            want = native_int4.kernels().int4_gemm(x, native_int4.avx2_layout(values), scale)
            assert torch.equal(got, want.bfloat16())
        else:
            assert hasattr(layer, "weight_rows")


def test_a_failed_build_leaves_the_portable_kernels(monkeypatch, tmp_path):
    """No compiler: ``kernels()`` is None and nothing asks for the AVX2 layout."""
    import torch.utils.cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setenv("VLLM_ERNIE_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL", "1")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    native_int4.kernels.cache_clear()
    try:
        assert native_int4.kernels() is None
        assert not native_int4.serves(256, 32)
    finally:
        monkeypatch.undo()
        native_int4.kernels.cache_clear()
    assert native_int4.kernels() is not None


@pytest.mark.parametrize(
    ("enabled", "inputs", "group", "served"),
    [("0", 256, 32, False), ("1", 256, 32, True), ("1", 96, 32, False), ("1", 256, 256, False)],
)
def test_serves_only_when_asked_and_the_shape_fits(monkeypatch, enabled, inputs, group, served):
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL", enabled)
    assert native_int4.serves(inputs, group) == served
