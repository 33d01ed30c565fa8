"""patch_cpu_unquantized_gemm: bf16 linears widened to fp32 at prefill size where vLLM's CPU
dispatch ends on PyTorch's slow bf16 GEMM (AVX2), checked against upstream's own dispatch and
float64 math. The model parity tests against transformers run through it on such tiers."""

import pytest
import torch
import torch.nn.functional as F
from vllm.model_executor.layers import utils

from vllm_ernie_moe import portable_kernels
from vllm_ernie_moe.patches import patch_cpu_unquantized_gemm as patch
from vllm_ernie_moe.patches.patching import unpatched

BF16_EPSILON = 2.0**-8


def layer_with(weight: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def test_probe_agrees_with_upstreams_dispatch():
    """Upstream keeps a bf16 weight (``F.linear``) exactly when the probe says oneDNN refuses it;
    where oneDNN takes it, upstream drops the layer's copy (``remove_weight``)."""
    layer = layer_with(torch.randn(64, 64).bfloat16())
    unpatched(utils.dispatch_cpu_unquantized_gemm)(layer, remove_weight=True)
    assert patch.onednn_refuses_bf16() == (layer.weight.numel() > 0)


def test_applies_only_where_the_bf16_gemm_is_slow_and_onednn_refuses_it(monkeypatch):
    expected = portable_kernels.bf16_gemm_is_slow() and patch.onednn_refuses_bf16()
    assert patch._slow_bf16_linear_here(None) == expected
    monkeypatch.setattr(portable_kernels, "bf16_gemm_is_slow", lambda: False)
    assert not patch._slow_bf16_linear_here(None)


def test_dispatch_gives_bf16_weights_the_op_and_leaves_the_rest():
    calls = []
    dispatch = patch._widening_bf16(lambda layer, remove_weight: calls.append(layer))
    bf16 = layer_with(torch.randn(64, 32).bfloat16())
    dispatch(bf16, remove_weight=True)
    assert (
        bf16.cpu_linear is torch.ops.vllm_ernie_moe.bf16_linear and bf16.weight.numel() == 64 * 32
    )
    others = [layer_with(torch.randn(64, 32)), layer_with(torch.randn(4, 64, 32).bfloat16())]
    for layer in others:
        dispatch(layer, remove_weight=True)
    assert calls == others


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "tokens",
    [1, portable_kernels.BF16_WIDEN_FROM_TOKENS - 1, portable_kernels.BF16_WIDEN_FROM_TOKENS, 200],
)
def test_op_is_one_bf16_rounding_from_the_exact_product(tokens, bias):
    """Both sides of the switch, a weight of more than one widening block: each output within one
    bf16 rounding (plus fp32 sums) of the float64 product of the same bf16 operands, and nearly
    every one that rounding itself (fp32 sums differ from float64 only near rounding ties)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, 320, generator=g).bfloat16()  # 3-D, one row per token
    outputs = portable_kernels.WIDEN_ROWS_PER_BLOCK + 96
    weight = (torch.randn(outputs, 320, generator=g) / 10).bfloat16()
    b = torch.randn(outputs, generator=g).bfloat16() if bias else None
    got = torch.ops.vllm_ernie_moe.bf16_linear(x, weight, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (1, tokens, outputs)
    assert got.is_contiguous()
    slack = BF16_EPSILON * exact.abs() + 1e-3
    assert ((got.double() - exact).abs() <= slack).all()
    assert (got == exact.bfloat16()).double().mean() > 0.99


def test_op_under_torch_compile_takes_both_sides():
    """One opaque op in a dynamically shaped graph: each call size takes its own side."""
    weight = (torch.randn(64, 128) / 10).bfloat16()
    compiled = torch.compile(
        lambda x: torch.ops.vllm_ernie_moe.bf16_linear(x, weight, None), dynamic=True
    )
    for tokens in (2, 3 * portable_kernels.BF16_WIDEN_FROM_TOKENS):
        x = torch.randn(tokens, 128).bfloat16()
        assert torch.equal(compiled(x), torch.ops.vllm_ernie_moe.bf16_linear(x, weight, None))


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("VLLM_ERNIE_MOE_BF16_WIDENING", "0")
    assert patch.apply() is False
