"""The plugin's AVX2 W4A16 kernel (``vllm_ernie_moe/native_int4.py``, opt-in through
``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=1``) against the portable W4A16 linear it would replace
(``portable_kernels.int4_group_linear``: PyTorch's int4 GEMM below 128 rows, the fp32 GEMM on
weights dequantized by torch ops from there on), on the 21B-A3B's linear and expert shapes, side by
side in one process, interleaved per shape and size. Weights: random int4 values with group
scales (128 inputs), ``COPIES`` copies cycling so that they come from memory. Rows: milliseconds
per call, the weight bytes' rate, the error against a float64 product with the bf16 activations.

    python benchmarks/avx2_int4_kernel.py [--rounds 2] [--tokens 1 8 32 127 128 512] [--json F]
"""

import json
import time

import torch
from int4_linear import SHAPES, kernel_bench_arguments, write_kernel_results

GROUP, COPIES = 128, 8
EXPERT_SHAPES = (("expert gate_up", 2560, 3072), ("expert down", 1536, 2560))


def main() -> None:
    from vllm_ernie_moe import native_int4, portable_kernels
    from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

    args = kernel_bench_arguments(__doc__, (1, 8, 32, 127, 128, 512))
    if native_int4.kernels() is None:
        raise SystemExit("avx2_int4_kernel.py: the AVX2 kernel did not build (see the log)")
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, inputs, outputs in (*SHAPES, *EXPERT_SHAPES):
        copies = []
        for _ in range(COPIES):
            values = torch.randint(-8, 8, (outputs, inputs), dtype=torch.int8, generator=generator)
            scale = torch.rand(outputs, inputs // GROUP, generator=generator) * 0.01 + 0.005
            scale = scale.bfloat16()
            copies.append(dict(
                values=values, scale=scale,
                portable=(portable_kernels.pack_int4(values),
                          portable_kernels.int4_scales_and_zeros(scale, scale.dtype),
                          pack_int4_rows(values), scale),
                avx2=(native_int4.avx2_layout(values), scale.float()),
            ))  # fmt: skip
        calls = {
            "portable W4A16": lambda x, c: portable_kernels.int4_group_linear(x, *c["portable"]),
            "AVX2 kernel": lambda x, c: native_int4.linear(x, *c["avx2"]),
        }
        weight = (copies[0]["values"].double().view(outputs, -1, GROUP)
                  * copies[0]["scale"].double()[..., None]).view(outputs, inputs)  # fmt: skip
        for tokens in args.tokens:
            x = torch.randn(tokens, inputs, generator=generator).bfloat16()
            reference = x.double() @ weight.t()
            repeats = max(3, 200 // tokens)
            for round_ in range(args.rounds):
                for kernel, call in calls.items():
                    out = call(x, copies[0])
                    start = time.perf_counter()
                    for i in range(repeats):
                        call(x, copies[i % COPIES])
                    ms = (time.perf_counter() - start) / repeats * 1e3
                    error = (out.double() - reference).abs().max() / reference.abs().max()
                    results.append(dict(
                        shape=name, tokens=tokens, round=round_, kernel=kernel, ms=ms,
                        weight_gb_per_s=inputs * outputs / 2 / ms / 1e6,
                        error_vs_bf16_activations=error.item(),
                    ))  # fmt: skip
                    print(json.dumps(results[-1]), flush=True)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
