"""Long context on the 21B-A3B geometry (4 layers, random bf16 weights): prefill and bs=1 decode
speed at long contexts, with the bf16 and the fp8 KV cache, each case in its own process.

    python benchmarks/long_context.py [--contexts 8192 32768] [--json out.json]

Per case: the time to prefill one random prompt of the context length (first token), then the
decode rate of 64 more tokens on that context (the prompt again, served from vLLM's prefix cache,
so the decode steps attend over the whole context), the KV cache the context occupies, and the
process tree's PSS after the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_engines import (
    REPO,
    checkpoint_paths,
    random_prompts,
    run_child,
    tree_pss_gib,
    vllm_generate,
)

KV_DTYPES = ("auto", "fp8")  # auto: the model dtype (bf16)
DECODE_TOKENS = 64


def kv_bytes_per_token(checkpoint: str, kv_dtype: str) -> int:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    element = 1 if kv_dtype == "fp8" else 2
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element


def case_worker(checkpoint: str, case: str) -> dict:
    import os

    from vllm import LLM

    # Over bench_engines' 1 GiB: the KV cache must hold the context (128K bf16 tokens: 1 GiB).
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"

    kv_dtype, context = case.split(":")
    context = int(context)
    llm = LLM(
        model=checkpoint,
        dtype="bfloat16",
        kv_cache_dtype=kv_dtype,
        max_model_len=context + DECODE_TOKENS + 8,
        max_num_seqs=1,
        max_num_batched_tokens=4096,
    )
    prompt = random_prompts(1, context, 100000, 0)

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        vllm_generate(llm, prompt, tokens)
        return time.perf_counter() - start

    prefill_s = timed(1)  # the whole prompt
    first_s = min(timed(1) for _ in range(2))  # cached prompt: one step
    full_s = min(timed(1 + DECODE_TOKENS) for _ in range(2))
    result = {
        "prefill_s": prefill_s,
        "prefill_tok_s": context / prefill_s,
        "decode_tok_s": DECODE_TOKENS / (full_s - first_s),
        "kv_cache_gib": context * kv_bytes_per_token(checkpoint, kv_dtype) / 2**30,
        "pss_gib": tree_pss_gib(),
    }
    llm.llm_engine.engine_core.shutdown()
    return result


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| context | KV cache | prefill tok/s | bs=1 decode tok/s | KV of the context (GiB) "
        "| PSS after (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for case, r in results.items():
        kv_dtype, context = case.split(":")
        lines.append(
            f"| {int(context) // 1024}K | {'bf16' if kv_dtype == 'auto' else kv_dtype} "
            f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['kv_cache_gib']:.3f} "
            f"| {r['pss_gib']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        case, checkpoint, out = args.child
        Path(out).write_text(json.dumps(case_worker(checkpoint, case)))
        return
    bf16, _ = checkpoint_paths(args.cache)
    out = args.cache / "long-context"
    out.mkdir(parents=True, exist_ok=True)
    results = {
        f"{kv}:{context}": run_child(
            __file__, f"{kv}:{context}", bf16, out / f"{kv}-{context}.json", {}
        )
        for context in args.contexts
        for kv in KV_DTYPES
    }
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
