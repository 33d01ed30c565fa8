"""The W4A16 linear kernel choice: ERNIE-4.5-21B-A3B's linear shapes (attention, shared experts,
dense MLP) on vLLM's int4 linear with int8 activations (``int4_scaled_mm_cpu``, the plugin's W4A16
linear where VNNI makes it exact, one call and as the plugin calls it: ``quant.int4.int4_linear``,
5-31 rows in calls of 4), PyTorch's int4 weight-only GEMM (the plugin's W4A16 linear at
few tokens elsewhere), the dequantize-then-GEMM path (from ``INT4_DEQUANTIZE_FROM_TOKENS`` on
elsewhere; on the bf16 GEMM, and on the fp32 one that the plugin takes where the bf16 one is slow),
vLLM's CPU WNA16 GEMM (``cpu_gemm_wna16``, its GPTQ/AWQ linear on CPU), PyTorch's int8 weight-only
GEMM and bf16, side by side in one process, interleaved per shape. vLLM's kernels run where the
tier's library has them (not in ``_C_AVX2``).

Weights: random int4 values with group scales (128 inputs), laid out as each kernel takes them;
``COPIES`` copies cycle so that they come from memory, not from the L3 cache. Rows: milliseconds
per call for each of ``TOKENS`` tokens, and the weight bytes' rate at 1 token.

    python benchmarks/int4_linear.py [--rounds 2] [--tokens 1 1024] [--json out.json]
"""

import argparse
import json
import time
from pathlib import Path

#: (name, inputs, outputs) of the 21B-A3B's linears, one TP rank.
SHAPES = (
    ("qkv_proj", 2560, 3584),
    ("o_proj", 2560, 2560),
    ("shared gate_up", 2560, 6144),
    ("shared down", 3072, 2560),
    ("dense down", 12288, 2560),
)
TOKENS, GROUP, COPIES = (1, 4, 5, 8, 16, 32, 64, 256, 1024), 128, 8
#: bytes per weight of each kernel's layout
BYTES = {"bf16": 2.0, "int8 (torch)": 1.0, "int4 (torch)": 0.5, "int4 (vLLM wna16)": 0.5,
         "int4 dequantized + bf16": 0.5, "int4 dequantized + fp32": 0.5,
         "int4 (vLLM, int8 activations)": 0.5,
         "int4 (vLLM, int8 activations, 4-row calls)": 0.5}  # fmt: skip


def kernels(inputs: int, outputs: int, generator) -> dict:
    """Kernel name -> callable(x, copy) on random int4 weights in that kernel's layout."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    from vllm_ernie_moe.portable_kernels import (
        int4_dequantized_linear,
        int4_scales_and_zeros,
        pack_int4,
    )
    from vllm_ernie_moe.quant.int4 import int4_linear, vllm_int4_blocked
    from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

    has_vllm_int4 = hasattr(torch.ops._C, "int4_scaled_mm_cpu")  # not in _C_AVX2
    torch4, vllm4, int8, bf16, rows, int8_inputs = [], [], [], [], [], []
    for _ in range(COPIES):
        q = torch.randint(-8, 8, (outputs, inputs), dtype=torch.int8, generator=generator)
        s = torch.rand(outputs, inputs // GROUP, generator=generator) * 0.01 + 0.005
        torch4.append((pack_int4(q), int4_scales_and_zeros(s, torch.bfloat16)))
        # vLLM's wna16 layout, as its CPUWNA16LinearKernel repacks GPTQ weights (16-column blocks)
        columns = pack_quantized_values_into_int32(
            (q.T + 8).to(torch.int32), scalar_types.uint4b8, 1
        )
        blocked = columns.view(inputs, -1, 2).permute(1, 0, 2).reshape(-1, inputs * 2)
        vllm4.append((blocked.contiguous(), s.T.contiguous().to(torch.bfloat16)))
        int8.append((q, torch.ones(outputs, dtype=torch.bfloat16)))
        bf16.append(q.to(torch.bfloat16))
        rows.append((pack_int4_rows(q), s.to(torch.bfloat16)))
        if has_vllm_int4:
            int8_inputs.append(vllm_int4_blocked(rows[-1][0], rows[-1][1].T.contiguous()))
    calls = {
        "bf16": lambda x, i: torch.nn.functional.linear(x, bf16[i]),
        "int8 (torch)": lambda x, i: torch._weight_int8pack_mm(x, *int8[i]),
        "int4 (torch)": lambda x, i: torch._weight_int4pack_mm_for_cpu(
            x, torch4[i][0], GROUP, torch4[i][1]
        ),
        "int4 (vLLM wna16)": lambda x, i: ops.cpu_gemm_wna16(
            x, vllm4[i][0], vllm4[i][1], None, None, 8, "vec"
        ),
        "int4 dequantized + bf16": lambda x, i: int4_dequantized_linear(
            x, *rows[i], torch.bfloat16
        ),
        "int4 dequantized + fp32": lambda x, i: int4_dequantized_linear(x, *rows[i], torch.float32),
        "int4 (vLLM, int8 activations)": lambda x, i: ops.int4_scaled_mm_cpu(
            x, *int8_inputs[i], None
        ),
        "int4 (vLLM, int8 activations, 4-row calls)": lambda x, i: int4_linear(x, *int8_inputs[i]),
    }
    return calls if has_vllm_int4 else {n: c for n, c in calls.items() if "vLLM" not in n}


def timed(call, x, calls: int) -> float:
    call(x, 0)
    start = time.perf_counter()
    for i in range(calls):
        call(x, i % COPIES)
    return (time.perf_counter() - start) / calls * 1e3


def kernel_bench_arguments(doc: str, tokens: tuple[int, ...]) -> argparse.Namespace:
    """``--rounds``, ``--tokens``, ``--json``: the command line of this and bf16_widening.py."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=tokens)
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def write_kernel_results(path: Path | None, results: list[dict]) -> None:
    """The rows, with the host's torch, threads and kernel tier, as JSON at ``path`` (if given):
    the output of this and the other kernel benchmarks that take :func:`kernel_bench_arguments`."""
    import torch

    if path:
        host = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
        }
        path.write_text(json.dumps({"host": host, "results": results}, indent=2))


def main() -> None:
    import torch

    args = kernel_bench_arguments(__doc__, TOKENS)
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, inputs, outputs in SHAPES:
        calls = kernels(inputs, outputs, generator)
        for tokens in args.tokens:
            x = torch.randn(tokens, inputs, dtype=torch.bfloat16, generator=generator)
            for round_ in range(args.rounds):
                for kernel, call in calls.items():
                    ms = timed(call, x, 200 if tokens < 64 else 10)
                    gbps = inputs * outputs * BYTES[kernel] / ms / 1e6
                    row = dict(shape=name, tokens=tokens, round=round_, kernel=kernel, ms=ms)
                    results.append(dict(row, weight_gb_per_s=gbps if tokens == 1 else None))
                    print(json.dumps(results[-1]), flush=True)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
