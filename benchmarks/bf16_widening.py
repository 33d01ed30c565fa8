"""bf16 GEMMs on the running kernel tier: PyTorch's bf16 ``F.linear`` against widening the bf16
operands to fp32 per call (whole weight, or 256-row blocks), with fp32 weights as the bound.

A probe for docs/cpu-tiers.md ("BF16 on AVX2 is slow beyond batch 1"), on the 21B's linear shapes
with random weights; the error is against a float64 product. As AVX2 on an AVX-512 host:

    python -m vllm_ernie_moe.cpu_tier avx2 python benchmarks/bf16_widening.py 8 1024
"""

import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (3072, 2560), "o": (2560, 2048), "shared_gate_up": (6144, 2560)}
SHAPES["shared_down"] = (2560, 3072)
BLOCK_ROWS = 256


def seconds_per_call(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def widened_in_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    blocks = [F.linear(xf, w[i : i + BLOCK_ROWS].float()) for i in range(0, len(w), BLOCK_ROWS)]
    return torch.cat(blocks, -1).to(x.dtype)


def main() -> None:
    torch.manual_seed(0)
    batches = [int(b) for b in sys.argv[1:]] or [8, 1024]
    print("capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
    for name, (rows, cols) in SHAPES.items():
        w = (torch.randn(rows, cols) * 0.02).bfloat16()
        w32 = w.float()
        for m in batches:
            x = torch.randn(m, cols).bfloat16()
            ref = F.linear(x.double(), w.double())
            options = {
                "bf16": lambda x=x, w=w: F.linear(x, w),
                "widen_whole": lambda x=x, w=w: F.linear(x.float(), w.float()).bfloat16(),
                "widen_blocked": lambda x=x, w=w: widened_in_blocks(x, w),
                "fp32_weights": lambda x=x, w32=w32: F.linear(x.float(), w32).bfloat16(),
            }
            cells = []
            for label, fn in options.items():
                ms = seconds_per_call(fn, 20 if m <= 8 else 3) * 1e3
                err = ((fn().double() - ref).norm() / ref.norm()).item()
                cells.append(f"{label} {ms:.2f}ms err {err:.1e}")
            print(name, m, "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
