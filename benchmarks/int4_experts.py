"""The routed experts of one ERNIE-4.5-21B-A3B layer on vLLM's CPU kernels: int4 (W4A8_DYNAMIC)
against int8 (W8A8_DYNAMIC), the same int4 values, side by side in one process.

Both take per-token int8 activations; the int4 path holds the weights as the plugin does after
loading a msModelSlim W4A8 checkpoint (``gptq_int4_columns`` of msModelSlim's packing, then vLLM's
blocking), the int8 path as it does for W8A8. ``--layers`` copies cycle so that the weights come
from memory, not from the L3 cache. Rows: milliseconds per layer for 1, 8 and 256 tokens (top-6 of
64 experts, random routing) and the resident bytes per layer.

    python benchmarks/int4_experts.py [--rounds 2] [--json out.json]
"""

import argparse
import json
import time
from pathlib import Path

EXPERTS, HIDDEN, INTER, TOP_K = 64, 2560, 1536, 6  # ERNIE-4.5-21B-A3B
TOKENS = (1, 8, 256)


def layer_weights(generator):
    """One layer's experts as (int4 kernel tensors, int8 kernel tensors), from random int4."""
    import torch
    from vllm._custom_ops import CPUQuantAlgo
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_int4_moe_layer_for_cpu

    from vllm_ernie_moe.quant.int4 import gptq_int4_columns, group_scales
    from vllm_ernie_moe.quant.msmodelslim import pack_int4_rows

    shapes = ((EXPERTS, 2 * INTER, HIDDEN), (EXPERTS, HIDDEN, INTER))
    values = [torch.randint(-8, 8, s, dtype=torch.int8, generator=generator) for s in shapes]
    scales = [torch.rand(s[:2], generator=generator) * 0.002 + 0.001 for s in shapes]
    int4 = prepare_int4_moe_layer_for_cpu(
        *(gptq_int4_columns(torch.stack([pack_int4_rows(e) for e in v])) for v in values),
        *(group_scales(s[..., None], v.shape[2], 128) for s, v in zip(scales, values, strict=True)),
        quant_algo=CPUQuantAlgo.GPTQ,
    )
    int8 = (*(torch.ops._C.convert_weight_packed(v) for v in values), *scales)
    return int4, int8


def run_layers(layers: list, method: int, x, routing, ids, out) -> None:
    """The experts of every layer in ``layers`` on the kernel path ``method``."""
    from vllm._custom_ops import fused_experts_cpu

    for w13, w2, s13, s2, *zero_points in layers:
        z13, z2 = zero_points or (None, None)
        fused_experts_cpu(out, x, w13, w2, routing, ids, method, s13, s2, z13, z2,
                          None, None, None, None, None, True)  # fmt: skip


def measure(layers: int, rounds: int) -> dict:
    import torch
    from vllm._custom_ops import CPUQuantMethod

    generator = torch.Generator().manual_seed(0)
    weights = [layer_weights(generator) for _ in range(layers)]
    paths = {
        "int4": ([w[0] for w in weights], CPUQuantMethod.INT4_W4A8),
        "int8": ([w[1] for w in weights], CPUQuantMethod.INT8_W8A8),
    }
    result: dict = {
        f"{name}_mb_per_layer": sum(t.numel() * t.element_size() for t in kernel[0]) / 1e6
        for name, (kernel, _) in paths.items()
    }
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, generator=generator).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in x])
        inputs = (
            x,
            torch.full((tokens, TOP_K), 1 / TOP_K),
            ids.to(torch.int32),
            torch.empty_like(x),
        )
        repeats = 20 if tokens < 100 else 3
        for _ in range(rounds):  # interleaved: the machine's speed drifts
            for name, (kernel, method) in paths.items():
                run_layers(kernel, method, *inputs)
                start = time.perf_counter()
                for _ in range(repeats):
                    run_layers(kernel, method, *inputs)
                ms = (time.perf_counter() - start) / repeats / layers * 1e3
                result.setdefault(f"{name}_ms_{tokens}_tokens", []).append(round(ms, 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="weight copies cycled (> L3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = measure(args.layers, args.rounds)
    print(json.dumps(result, indent=2))
    for tokens in TOKENS:
        ratios = [
            round(b / a, 2)
            for a, b in zip(result[f"int4_ms_{tokens}_tokens"], result[f"int8_ms_{tokens}_tokens"])
        ]
        print(f"{tokens} tokens: int8 time / int4 time per round {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
