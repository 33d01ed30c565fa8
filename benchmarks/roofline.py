"""The batch-1 decode roofline of this machine: bytes a token reads / the rate a GEMV streams them.

At batch 1 every weight a token touches is read once from memory and used for one multiply-add:
decode speed is the weight bytes per token divided by the bandwidth a matrix-vector product
reaches. Two bandwidths are measured here on all cores, with weights far larger than the L3
cache (cycled, so nothing is served from cache):

- the batch-1 GEMV rate of each CPU GEMM back end the running tier has (vLLM's oneDNN and
  sgl-kernel, PyTorch's, the plugin's portable int8; bf16 and int8 with dynamic per-token
  activations);
- a plain streaming read (``torch.sum`` over bf16).

The roofline uses the best of these rates: no decode step can read its weights faster.

    python benchmarks/roofline.py benchmarks/out/21b-4layers-bf16 [--by-shape]

``--by-shape`` also measures every back end on each linear shape of the model at batch 1 and 8,
side by side in one process: which kernel a layer should use on this CPU.
"""

import argparse
import json
import time
from pathlib import Path

L3_MULTIPLE = 8  # bytes cycled through per measurement / L3 size (32 MiB here)


def _attention_widths(config: dict) -> tuple[int, int]:
    """Output widths of the query projection and of each of the key and value projections."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim


def active_parameters(config: dict) -> dict[str, int]:
    """Weights one decoded token multiplies with: the lm_head and, per layer, attention, the dense
    MLP or the router + top-k routed experts + shared experts (embedding: one row, ignored)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q, kv = _attention_widths(config)
    attention = hidden * (q + 2 * kv) + q * hidden
    start = config.get("moe_layer_start_index", 0)
    end = config.get("moe_layer_end_index", -1)
    layers = config["num_hidden_layers"]
    end = layers - 1 if end in (-1, None) else end
    interval = config.get("moe_layer_interval", 1)
    moe_inter = config["moe_intermediate_size"]
    layer_params = 0
    for i in range(layers):
        is_moe = start <= i <= end and (i - start) % interval == 0
        if is_moe:
            experts = config["moe_k"] + config.get("moe_num_shared_experts", 0)
            ffn = 3 * hidden * moe_inter * experts + hidden * config["moe_num_experts"]
        else:
            ffn = 3 * hidden * config["intermediate_size"]
        layer_params += attention + ffn
    return {"lm_head": vocab * hidden, "layers": layer_params}


def _stream_rate(run, weight_bytes: int, seconds: float = 2.0) -> float:
    """GB/s of ``run(i)`` (reads weight set ``i``), cycling the sets, best of 3 windows."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            run(n)
            n += 1
        best = max(best, n * weight_bytes / (time.perf_counter() - start) / 1e9)
    return best


_UNMEASURED: set[str] = set()  # kernels this tier lacks, said once


def _gemv_kernels(rows: int, hidden: int):
    """name -> (weight bytes, run(x, i)) for the CPU GEMMs this tier has, each over its own
    weight set: vLLM's oneDNN and sgl-kernel GEMMs where its loaded library and the CPU have them
    (no bf16 oneDNN matmul and no sgl ops on AVX2; oneDNN int8 only where it is exact, with VNNI:
    docs/cpu-tiers.md), PyTorch's bf16 GEMM and the plugin's portable int8 GEMM (W8A8: per-token
    int8 activations; W8A16: bf16 activations) everywhere."""
    import sys

    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    from vllm_ernie_moe import portable_kernels

    sets = L3_MULTIPLE * 32 * 2**20 // (rows * hidden) + 1
    bf16 = [torch.randn(rows, hidden, dtype=torch.bfloat16) for _ in range(sets)]
    int8 = [torch.randint(-127, 128, (rows, hidden), dtype=torch.int8) for _ in range(sets)]
    scale = torch.rand(rows, dtype=torch.float32) / 100
    scale_bf16 = scale.to(torch.bfloat16)  # W8A16 applies it in the model dtype
    size = rows * hidden

    def onednn_bf16():
        handles = [ops.create_onednn_mm(w.t(), 32) for w in bf16]
        return lambda x, i: ops.onednn_mm(handles[i % sets], x, None)

    def sgl_bf16():
        packed = [torch.ops._C.convert_weight_packed(w) for w in bf16]
        return lambda x, i: ops.weight_packed_linear_cpu(x, packed[i % sets], rows, None)

    def onednn_int8():
        if not portable_kernels.exact_int8_gemm():
            raise RuntimeError("saturates without VNNI")
        handles = [
            ops.create_onednn_scaled_mm(w.t(), scale[:, None], torch.bfloat16, True, False, 32)
            for w in int8
        ]

        def run(x, i):
            x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
            ops.onednn_scaled_mm(handles[i % sets], x_q, out, x_s, x_zp, None, None)

        return run

    def sgl_int8():
        packed = [torch.ops._C.convert_weight_packed(w) for w in int8]
        return lambda x, i: torch.ops._C.int8_scaled_mm_with_quant(
            x, packed[i % sets], scale, None, x.dtype, True
        )

    builders = {
        "read (torch.sum, bf16)": (2 * size, lambda: lambda x, i: bf16[i % sets].sum()),
        "torch bf16": (2 * size, lambda: lambda x, i: F.linear(x, bf16[i % sets])),
        "oneDNN bf16": (2 * size, onednn_bf16),
        "sgl bf16": (2 * size, sgl_bf16),
        "portable int8 W8A8": (
            size,
            lambda: lambda x, i: portable_kernels.int8_gemm(x, int8[i % sets], scale, True),
        ),
        "portable int8 W8A16": (
            size,
            lambda: lambda x, i: portable_kernels.int8_gemm(x, int8[i % sets], scale_bf16, False),
        ),
        "oneDNN int8": (size, onednn_int8),
        "sgl int8": (size, sgl_int8),
    }
    kernels = {}
    for name, (weight_bytes, build) in builders.items():
        try:
            kernels[name] = (weight_bytes, build())
        except (RuntimeError, AttributeError) as error:  # not in this tier's library or ISA
            if name not in _UNMEASURED:
                _UNMEASURED.add(name)
                print(f"roofline: {name} not measured on this tier ({error})", file=sys.stderr)
    return kernels


def measure_bandwidth(hidden: int = 2560, rows: int = 12288) -> dict[str, float]:
    """GB/s of this tier's CPU GEMM kernels at batch 1 (and of a plain read), on all cores."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(1, hidden, dtype=torch.bfloat16)
    return {
        name: _stream_rate(lambda i, run=run: run(x, i), size)
        for name, (size, run) in _gemv_kernels(rows, hidden).items()
    }


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of the model's linear layers (unsharded; the routed experts have the shared
    experts' shape divided by their number)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q, kv = _attention_widths(config)
    shared = config["moe_intermediate_size"] * config.get("moe_num_shared_experts", 1)
    return {
        "qkv_proj": (q + 2 * kv, hidden),
        "o_proj": (hidden, q),
        "dense gate_up_proj": (2 * inter, hidden),
        "dense down_proj": (hidden, inter),
        "shared experts gate_up_proj": (2 * shared, hidden),
        "shared experts down_proj": (hidden, shared),
        "lm_head": (config["vocab_size"], hidden),
    }


PREFILL_BATCH = 1024


def rates_by_shape(config: dict, batches: tuple[int, ...] = (1, 8, PREFILL_BATCH)) -> list[dict]:
    """Weight GB/s of each GEMM back end for each linear shape of the model and batch size: which
    back end a layer should use, measured in one process minutes apart at most. (At prefill size
    the lm_head is left out: a prompt needs its logits for one token only.)"""
    import torch

    rows = []
    for batch in batches:
        for name, (out, inp) in linear_shapes(config).items():
            if batch == PREFILL_BATCH and name == "lm_head":
                continue
            x = torch.randn(batch, inp, dtype=torch.bfloat16)
            kernels = _gemv_kernels(out, inp)
            kernels.pop("read (torch.sum, bf16)")
            rates = {
                kernel: _stream_rate(lambda i, run=run, x=x: run(x, i), size, seconds=0.6)
                for kernel, (size, run) in kernels.items()
            }
            rows.append({"linear": f"{name} [{out} x {inp}]", "batch": batch, **rates})
    return rows


def roofline(config: dict, bandwidth: dict[str, float]) -> dict[str, float]:
    """Batch-1 decode tok/s if every weight byte streamed at the best rate measured on this machine
    (any kernel): bf16 weights, and all-int8 weights (W8A8 with int8 lm_head)."""
    p = active_parameters(config)
    weights = p["lm_head"] + p["layers"]
    best = max(bandwidth.values()) * 1e9
    return {
        "best_gb_s": best / 1e9,
        "bf16_gb_per_token": 2 * weights / 1e9,
        "int8_gb_per_token": weights / 1e9,
        "bf16_tok_s": best / (2 * weights),
        "int8_tok_s": best / weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "--by-shape", action="store_true", help="also each back end's rate per linear shape"
    )
    args = parser.parse_args()
    from vllm_ernie_moe import envs

    envs.use_all_cpu_cores()
    config = json.loads((args.checkpoint / "config.json").read_text())
    bandwidth = measure_bandwidth(config["hidden_size"])
    print(json.dumps({**bandwidth, **roofline(config, bandwidth)}, indent=2))
    if args.by_shape:
        print_rates_by_shape(rates_by_shape(config))


def print_rates_by_shape(rows: list[dict]) -> None:
    """Markdown: weight GB/s at decode batch sizes; at prefill size, compute in TOP/s."""
    kernels = [k for k in rows[0] if k not in ("linear", "batch")]
    header = f"| linear [out x in] | batch | {' | '.join(kernels)} | sgl / oneDNN int8 |"
    for unit, prefill in (("weight GB/s", False), ("TOP/s", True)):
        print(f"\n{unit}\n\n{header}\n" + "|---" * (len(kernels) + 3) + "|")
        for row in rows:
            if (row["batch"] == PREFILL_BATCH) != prefill:
                continue
            cells = []
            for kernel in kernels:
                rate = row.get(kernel, float("nan"))
                if prefill:  # weight GB/s x 2 ops per weight and token / bytes per weight
                    rate *= 2 * row["batch"] / (1 if "int8" in kernel else 2) / 1e3
                cells.append(f"{rate:.{2 if prefill else 1}f}")
            rates = " | ".join(cells)
            ratio = row.get("sgl int8", float("nan")) / row.get("oneDNN int8", float("nan"))
            print(f"| {row['linear']} | {row['batch']} | {rates} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
