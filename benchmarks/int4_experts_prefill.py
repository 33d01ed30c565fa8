"""W4A16 routed experts at prefill sizes where the plugin runs its portable experts (AVX2):
PyTorch's int4 GEMM per expert (``portable_kernels.experts``' path) against dequantizing each
expert's int4 weights and running the fp32 GEMM on them, as the W4A16 linears do from 128 tokens
on (``int4_dequantized_linear``). Three rows per size: the dequantization made with torch ops from
the weights as the plugin holds them (PyTorch's int4 layout), the same GEMMs on weights dequantized
beforehand (what a dequantization that cost nothing would give) and the dequantization alone. One
ERNIE-4.5-21B-A3B layer (64 experts, top-6, random routing and int4 values), interleaved rounds;
the largest difference from the int4 GEMM's output, relative to it. Whether the experts should
take the linears' path at prefill sizes (docs/cpu-tiers.md).

    python benchmarks/int4_experts_prefill.py [--rounds 2] [--tokens 256 1024 2048] [--json F]
"""

import json
import time

import torch
import torch.nn.functional as F
from bf16_experts import experts_row, random_routing
from int4_experts import EXPERTS, HIDDEN, INTER
from int4_linear import kernel_bench_arguments, write_kernel_results

from vllm_ernie_moe.portable_kernels import (
    int4_group_gemm,
    int4_scales_and_zeros,
    pack_int4,
    run_experts,
)

#: PyTorch's CPU int4 layout (``_convert_weight_to_int4pack_for_cpu``, torch 2.13): blocks of 32
#: output rows; per block and input, 16 bytes whose low nibbles are rows 0-15 and high ones 16-31.
BLOCK_ROWS = 32


def unpack_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """``[N, K/2]`` of :func:`pack_int4` -> the int4 values ``[N, K]`` (int8, -8..7)."""
    outputs, inputs = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(outputs // BLOCK_ROWS, inputs, BLOCK_ROWS // 2)
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=2)  # [N/32, K, 2, 16]
    return nibbles.permute(0, 2, 3, 1).reshape(outputs, inputs).to(torch.int8) - 8


def dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Each weight as value times its group's scale, rounded once to the scales' dtype (bf16),
    widened to fp32."""
    values = unpack_int4pack(packed)
    outputs, inputs = values.shape
    scale = scales_and_zeros[..., 0].t()  # [N, K / group]
    grouped = values.view(outputs, scale.shape[1], -1) * scale[:, :, None]
    return grouped.view(outputs, inputs).float()


def layer(generator) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """(packed, scales_and_zeros) per expert, for gate/up and down."""
    weights = []
    for outputs, inputs in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        experts = []
        for _ in range(EXPERTS):
            values = torch.randint(-8, 8, (outputs, inputs), generator=generator)
            scale = torch.rand(outputs, inputs // 128, generator=generator) * 0.002 + 0.001
            packed = pack_int4(values.to(torch.int32))
            assert torch.equal(unpack_int4pack(packed).long(), values), "int4 layout changed"
            experts.append((packed, int4_scales_and_zeros(scale, torch.bfloat16)))
        weights.append(experts)
    return weights


def kernels(weights) -> dict:
    dequantized = [[dequantize(*expert) for expert in which] for which in weights]

    def call(gemm):
        return lambda x, ids, routing: run_experts(x, routing, ids.long(), gemm)

    return {
        "int4 GEMM per expert": call(lambda e, w, h: int4_group_gemm(h.bfloat16(), *weights[w][e])),
        "dequantized with torch ops, fp32 GEMM": call(
            lambda e, w, h: F.linear(h.float(), dequantize(*weights[w][e])).bfloat16()
        ),
        "fp32 GEMM on weights dequantized beforehand": call(
            lambda e, w, h: F.linear(h.float(), dequantized[w][e]).bfloat16()
        ),
    }


def dequantize_layer(weights) -> None:
    for which in weights:
        for expert in which:
            dequantize(*expert)


def main() -> None:
    args = kernel_bench_arguments(__doc__, (256, 1024, 2048))
    generator = torch.Generator().manual_seed(0)
    weights = layer(generator)
    calls, results = kernels(weights), []
    for tokens in args.tokens:
        x, routing, ids = random_routing(tokens, generator)
        reference = calls["int4 GEMM per expert"](x, ids, routing).double()
        for round_ in range(args.rounds):
            for kernel, call in calls.items():
                start = time.perf_counter()
                out = call(x, ids, routing)
                ms = (time.perf_counter() - start) * 1e3
                results.append(experts_row(tokens, round_, kernel, ms, out, reference, "int4_gemm"))
                print(json.dumps(results[-1]), flush=True)
            start = time.perf_counter()
            dequantize_layer(weights)
            ms = (time.perf_counter() - start) * 1e3
            written = EXPERTS * 3 * HIDDEN * INTER * 4  # fp32 bytes
            results.append(dict(tokens=tokens, round=round_, kernel="dequantization alone", ms=ms,
                                fp32_gb_per_s=written / ms / 1e6))  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
