"""bf16 routed experts on AVX2: vLLM's "vec" kernel (``cpu_fused_moe``, what vLLM runs for
unquantized experts on the ``_C_AVX2`` tier) against one GEMM pair per expert on the fp32 GEMM,
each weight widened 256 rows at a time (``portable_kernels.run_experts`` with
``widened_bf16_linear``, the plugin's bf16 linears' path on AVX2) and against plain bf16
``F.linear`` per expert. One ERNIE-4.5-21B-A3B layer (64 experts, top-6, random routing and
weights), interleaved rounds; the largest difference from the "vec" output, relative to it.
Whether the bf16 experts should take the widened path on AVX2 (docs/cpu-tiers.md).

    python benchmarks/bf16_experts.py [--rounds 2] [--tokens 1 8 128 1024] [--json out.json]
"""

import json
import time

import torch
import torch.nn.functional as F
from int4_experts import EXPERTS, HIDDEN, INTER, TOP_K
from int4_linear import kernel_bench_arguments, write_kernel_results

from vllm_ernie_moe.portable_kernels import run_experts, widened_bf16_linear


def kernels(generator) -> dict:
    from vllm import _custom_ops as ops

    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=generator) * 0.02).bfloat16()
    packed = [ops.cpu_prepack_moe_weight(w, "vec") for w in (w13, w2)]

    def vec(x, weights, ids):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, *packed, None, None, weights, ids, "silu", "vec", False)
        return out

    def per_expert(linear):
        def call(x, weights, ids):
            gemm = lambda e, which, h: linear(h.to(x.dtype), (w13, w2)[which][e])  # noqa: E731
            return run_experts(x, weights, ids.long(), gemm)

        return call

    return {"vLLM vec": vec, "widened per expert": per_expert(widened_bf16_linear),
            "bf16 F.linear per expert": per_expert(F.linear)}  # fmt: skip


def random_routing(tokens: int, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 hidden states ``[tokens, HIDDEN]``, their top-k routing weights (normalized) and
    expert ids (int32), from random router probabilities."""
    x = torch.randn(tokens, HIDDEN, generator=generator).bfloat16()
    probabilities = torch.randn(tokens, EXPERTS, generator=generator).softmax(-1)
    weights, ids = torch.topk(probabilities, TOP_K)
    return x, weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def experts_row(tokens: int, round_: int, kernel: str, ms: float, out: torch.Tensor,
                reference: torch.Tensor, reference_name: str) -> dict:  # fmt: skip
    """One result row: the layer's time, its TOP/s and the largest difference of ``out`` from
    the ``reference`` kernel's output, relative to it."""
    difference = (out.double() - reference).abs().max() / reference.abs().max()
    return {"tokens": tokens, "round": round_, "kernel": kernel, "ms": ms,
            "tops": 2 * tokens * TOP_K * 3 * HIDDEN * INTER / ms / 1e9,
            f"difference_from_{reference_name}": difference.item()}  # fmt: skip


def main() -> None:
    args = kernel_bench_arguments(__doc__, (1, 8, 128, 1024))
    generator = torch.Generator().manual_seed(0)
    calls, results = kernels(generator), []
    for tokens in args.tokens:
        x, weights, ids = random_routing(tokens, generator)
        reference = calls["vLLM vec"](x, weights, ids).double()
        for round_ in range(args.rounds):
            for kernel, call in calls.items():
                out = call(x, weights, ids)
                repeats = max(2, 64 // tokens)
                start = time.perf_counter()
                for _ in range(repeats):
                    call(x, weights, ids)
                ms = (time.perf_counter() - start) / repeats * 1e3
                results.append(experts_row(tokens, round_, kernel, ms, out, reference, "vec"))
                print(json.dumps(results[-1]), flush=True)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
