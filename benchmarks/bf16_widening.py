"""bf16 linears on the running kernel tier: PyTorch's bf16 ``F.linear`` (where vLLM's CPU dispatch
ends when oneDNN refuses bf16, as on AVX2) against the plugin's widening path
(``portable_kernels.widened_bf16_linear``: the weight widened to fp32 a block at a time, the fp32
GEMM) and the shipped op that switches between them (``bf16_linear``, from
``BF16_WIDEN_FROM_TOKENS`` tokens), with fp32 weights kept in memory as a bound. The 21B-A3B's
linear shapes (``int4_linear.SHAPES``), random weights, ``COPIES`` copies cycling so that they come
from memory; interleaved rounds; the error against a float64 product. Chooses
``BF16_WIDEN_FROM_TOKENS`` (docs/cpu-tiers.md).

    python benchmarks/bf16_widening.py [--rounds 2] [--tokens 1 8 16 1024] [--json out.json]
    python -m vllm_ernie_moe.cpu_tier avx2 python benchmarks/bf16_widening.py   # on AVX-512 hosts
"""

import json
import time

import torch
import torch.nn.functional as F
from int4_linear import SHAPES, kernel_bench_arguments, write_kernel_results

from vllm_ernie_moe.portable_kernels import bf16_linear, widened_bf16_linear

TOKENS, COPIES = (1, 4, 8, 12, 16, 24, 32, 64, 128), 4
#: seconds each measurement runs for (at least one call)
BUDGET_S = 0.4


def kernels(inputs: int, outputs: int, generator) -> tuple[list[torch.Tensor], dict]:
    """Random bf16 weights and kernel name -> callable(x, copy) on them."""
    weights = [
        (torch.randn(outputs, inputs, generator=generator) * 0.02).bfloat16() for _ in range(COPIES)
    ]
    fp32 = [w.float() for w in weights]
    return weights, {
        "bf16 F.linear": lambda x, i: F.linear(x, weights[i]),
        "widened to fp32": lambda x, i: widened_bf16_linear(x, weights[i]),
        "bf16_linear op": lambda x, i: bf16_linear(x, weights[i], None),
        "fp32 weights (bound)": lambda x, i: F.linear(x.float(), fp32[i]).bfloat16(),
    }


def timed(call, x: torch.Tensor) -> float:
    """Milliseconds per call, the copies in turn."""
    call(x, 0)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < BUDGET_S:
        call(x, calls % COPIES)
        calls += 1
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    args = kernel_bench_arguments(__doc__, TOKENS)
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, inputs, outputs in SHAPES:
        weights, calls = kernels(inputs, outputs, generator)
        for tokens in args.tokens:
            x = torch.randn(tokens, inputs, generator=generator).bfloat16()
            exact = F.linear(x.double(), weights[0].double())
            for round_ in range(args.rounds):
                for kernel, call in calls.items():
                    error = (call(x, 0).double() - exact).norm() / exact.norm()
                    ms = timed(call, x)
                    results.append(
                        dict(shape=name, tokens=tokens, round=round_, kernel=kernel, ms=ms,
                             tops=2 * tokens * inputs * outputs / ms / 1e9,
                             relative_error=error.item())
                    )  # fmt: skip
                    print(json.dumps(results[-1]), flush=True)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
