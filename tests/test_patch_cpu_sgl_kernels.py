"""patch_cpu_sgl_kernels: vLLM's sgl-kernel GEMMs on AVX-512 CPUs without AMX, checked against plain
PyTorch math (the model-level parity tests then run through them on such CPUs)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import vllm
from reference import int8_rows
from vllm.model_executor.kernels.linear.scaled_mm import cpu as scaled_mm_cpu
from vllm.model_executor.layers import utils

from vllm_ernie_moe import compat
from vllm_ernie_moe.patches import patch_cpu_sgl_kernels

pytestmark = pytest.mark.skipif(
    not compat.sgl_kernel_choice_measured(),
    reason=f"patch_cpu_sgl_kernels is for vLLM {compat.SGL_KERNELS_MEASURED_ON} (vLLM 0.27's "
    "CPU experts route themselves and its sgl GEMMs sit behind VLLM_CPU_SGL_KERNEL)",
)
needs_avx512_without_amx = pytest.mark.skipif(
    not patch_cpu_sgl_kernels.avx512_without_amx(),
    reason="the patch targets AVX-512 CPUs without AMX",
)


@needs_avx512_without_amx
def test_upstream_refuses_sgl_kernels_without_amx():
    """The gap the patch exists for; when this fails, upstream chose them itself: remove it."""
    patch_cpu_sgl_kernels.apply()
    original = utils.check_cpu_sgl_kernel.__wrapped__
    assert not original(2560, 2560, torch.bfloat16)
    assert not original(2560, 2560, torch.int8)


@needs_avx512_without_amx
def test_both_call_sites_see_the_widened_choice():
    assert patch_cpu_sgl_kernels.apply() is True
    patched = utils.check_cpu_sgl_kernel
    assert patch_cpu_sgl_kernels.apply() is True and utils.check_cpu_sgl_kernel is patched
    assert scaled_mm_cpu.check_cpu_sgl_kernel is patched
    assert patched(103424, 2560, torch.bfloat16)  # no size cap: the lm_head too
    assert patched(3072, 2560, torch.int8)
    assert not patched(2560, 2560, torch.float16)  # fp16 needs AMX-FP16: unchanged
    assert not patched(2560, 2560, torch.float32)
    assert not patched(2560, 100, torch.bfloat16)  # k % 32: the kernels' layout
    assert not patched(2560, 12288, torch.bfloat16)  # a wide input (dense down_proj): oneDNN's
    assert patched(2560, 12288, torch.int8)


@needs_avx512_without_amx
@pytest.mark.parametrize("tokens", [1, 8, 100])
def test_sgl_kernels_match_plain_math(tokens):
    g = torch.Generator().manual_seed(tokens)
    n, k = 256, 320
    x = torch.randn(tokens, k, generator=g).bfloat16()
    weight = (torch.randn(n, k, generator=g) / 10).bfloat16()
    packed = torch.ops._C.convert_weight_packed(weight)
    got = vllm._custom_ops.weight_packed_linear_cpu(x, packed, n, None)
    want = x.float() @ weight.float().t()
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)

    w_int8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) / 100
    got = torch.ops._C.int8_scaled_mm_with_quant(
        x, torch.ops._C.convert_weight_packed(w_int8), w_scale, None, x.dtype, True
    )
    x_q, x_scale = int8_rows(x.float())
    want = (x_q @ w_int8.float().t()) * x_scale * w_scale
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_environment_variable_turns_it_off():
    code = (
        "from vllm.model_executor.layers import utils;"
        "from vllm_ernie_moe.patches import patch_cpu_sgl_kernels as p;"
        "print(p.apply(), hasattr(utils.check_cpu_sgl_kernel, '_vllm_ernie_moe_patch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "VLLM_ERNIE_MOE_SGL_KERNELS": "0", "VLLM_PLUGINS": "none"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[-2:] == ["False", "False"]


@needs_avx512_without_amx
def test_bf16_experts_are_offered_first_on_cpu():
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    patch_cpu_sgl_kernels.apply()
    kernels = unquantized.backend_to_kernel_cls(unquantized.UnquantizedMoeBackend.CPU)
    assert kernels[0].__name__ == "SglCPUUnquantizedExperts"
    assert kernels[1:] == unquantized.backend_to_kernel_cls.__wrapped__(
        unquantized.UnquantizedMoeBackend.CPU
    )


@needs_avx512_without_amx
@pytest.mark.parametrize("tokens", [1, 8, 100])
def test_fused_bf16_experts_match_plain_math(tokens):
    """The kernel the experts class runs: routed SwiGLU experts, weighted sum, in plain PyTorch."""
    from vllm._custom_ops import CPUQuantMethod, fused_experts_cpu

    g = torch.Generator().manual_seed(tokens)
    experts, hidden, inner, top_k = 8, 64, 96, 3
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    w13 = (torch.randn(experts, 2 * inner, hidden, generator=g) / 8).bfloat16()
    w2 = (torch.randn(experts, hidden, inner, generator=g) / 8).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    out = torch.empty_like(x)
    fused_experts_cpu(
        out, x, torch.ops._C.convert_weight_packed(w13), torch.ops._C.convert_weight_packed(w2),
        weights, ids.to(torch.int32), CPUQuantMethod.UNQUANT, None, None, None, None, None,
    )  # fmt: skip
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for slot in range(top_k):
            e = ids[t, slot]
            gate, up = (x[t].float() @ w13[e].float().t()).chunk(2)
            want[t] += weights[t, slot] * ((F.silu(gate) * up) @ w2[e].float().t())
    assert torch.allclose(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
