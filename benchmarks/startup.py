"""Start-up: seconds from a process's start to its first answered request, this plugin against
llama.cpp on the same weights, interleaved in one run.

The plugin starts once "cold" (an empty ``VLLM_CACHE_ROOT`` and Inductor cache: vLLM compiles the
model and the plugin repacks the weights, writing the caches) and then "warm" (the caches filled
by the cold start); llama.cpp has no such caches. Each start is a fresh process on the
checkpoints of ``bench_engines.py`` (``--layers 28``: the whole 21B-A3B); its request is a
32-token prompt answered with one token. Also recorded: peak memory (PSS) of the process tree
while starting; the vLLM engine's log (the phases of its start) in the .log next to each result;
each plugin start's greedy answer (16 tokens, after the clock stops): warm starts must answer as
the cold one did; each start's rate over its first 64 batch-1 tokens (after the clock; pages not yet
touched are read then): a start-up variant must not cost decode speed.

    python benchmarks/startup.py --layers 28 --int4-source w4a16 --engines w4a16-int8-head \\
        llama.cpp-q4_k_m --rounds 2 --cache /work/bench/cache --json out.json \\
        [--variant-env VLLM_ENABLE_V1_MULTIPROCESSING=0] [--serve] [--drop-page-cache]

``--serve`` starts the plugin as ``vllm serve`` (its clock from the command's start to the first
completion answered over loopback) instead of an in-process ``LLM``. ``--drop-page-cache``
starts every engine with nothing of its files in memory: otherwise a start right after another
start of the same engine finds its weights cached and one after the other engine reads them.
"""

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench_engines import (
    BATCH,
    INT4_SOURCES,
    PeakMemory,
    engine_checkpoint,
    engine_environment,
    greedy_token_ids,
    random_prompts,
    run_child,
    vllm_engine,
    vllm_generate,
)
from lazy_checkpoint_read import drop_page_cache

DECODE_TOKENS = 64  # the batch-1 rate after the clock: prefill of 32 tokens, then 64 steps
SERVED = "serve:"  # the plugin's starts are `vllm serve` commands (--serve)


def decode_rate(answer: Callable[[int], object]) -> float:
    """Tokens per second of ``answer(DECODE_TOKENS)``: one prompt answered with that many tokens."""
    start = time.perf_counter()
    answer(DECODE_TOKENS)
    return DECODE_TOKENS / (time.perf_counter() - start)


def served_first_answer(checkpoint: str, log: Path) -> dict:
    """``vllm serve`` started from this process, answering one completion over loopback: seconds
    from the command's start to the answer (``/health`` is polled once a second)."""
    import requests

    from vllm_ernie_moe.tools.served import vllm_serve

    memory = PeakMemory()
    prompt = random_prompts(1, 32, 100000, 3)[0]
    start = time.time()
    args = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", str(BATCH)]
    with vllm_serve(checkpoint, *args, log=log, start_timeout=1800) as served:  # a cold start

        def complete(tokens: int) -> list[int]:
            request = dict(model=checkpoint, prompt=prompt, max_tokens=tokens, min_tokens=tokens)
            reply = requests.post(
                f"{served.base_url}/v1/completions",
                json=dict(request, temperature=0, ignore_eos=True, return_token_ids=True),
                timeout=600,
            )
            reply.raise_for_status()
            return reply.json()["choices"][0]["token_ids"]

        complete(1)
        result = {"startup_s": time.time() - start, "peak_pss_gib": memory.stop()}
        result["decode_tok_s"] = decode_rate(complete)
        result["greedy_tokens"] = complete(16)
    return result


def first_answer(engine: str, checkpoint: str, out: str) -> dict:
    """In this fresh process: load ``engine``, answer one request; seconds since the process
    started. ``serve:ENGINE``: :func:`served_first_answer` (its server's log beside ``out``)."""
    import psutil

    if engine.startswith(SERVED):
        return served_first_answer(checkpoint, Path(out).with_suffix(".serve.log"))
    memory = PeakMemory()
    if engine.startswith("llama.cpp"):
        from llama_cpp_engine import timed_engine

        generate, _ = timed_engine(Path(checkpoint), threads=psutil.cpu_count())
    else:
        llm = vllm_engine(checkpoint)

        def generate(prompts, tokens):
            vllm_generate(llm, prompts, tokens)

    prompt = random_prompts(1, 32, 100000, 3)
    generate(prompt, 1)
    startup_s = time.time() - psutil.Process().create_time()
    result = {"startup_s": startup_s, "peak_pss_gib": memory.stop()}
    result["decode_tok_s"] = decode_rate(lambda tokens: generate(prompt, tokens))
    if not engine.startswith("llama.cpp"):  # after the clock: a warm start must answer the same
        (result["greedy_tokens"],) = greedy_token_ids(llm, prompt, 16)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs=2, metavar=("PLUGIN", "LLAMA_CPP"))
    parser.add_argument("--cache", help="bench_engines.py's checkpoint cache")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--int4-source", choices=INT4_SOURCES, default="w4a16")
    parser.add_argument("--rounds", type=int, default=2, help="warm plugin / llama.cpp pairs")
    parser.add_argument(
        "--variant-env",
        nargs="+",
        metavar="NAME=VALUE",
        help="add a warm plugin start with these environment variables to each round (an A/B), "
        "after one start with them before the rounds",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start the plugin as `vllm serve` and ask it over HTTP (llama.cpp stays in-process)",
    )
    parser.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="empty the page cache before every start (root): each engine reads its files from "
        "storage, whichever engine ran before it",
    )
    parser.add_argument("--llama-cpp-path", help="a llama-cpp-python build to import")
    parser.add_argument("--llama-cpp-src")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[2]).write_text(json.dumps(first_answer(*args.child)))
        return
    if not (args.engines and args.cache):
        parser.error("give --engines PLUGIN LLAMA_CPP and --cache")
    cache = Path(args.cache)
    plugin, llama = args.engines
    checkpoints = {
        e: engine_checkpoint(e, cache, args.layers, args.llama_cpp_src, args.int4_source)
        for e in args.engines
    }
    task = {plugin: f"{SERVED}{plugin}" if args.serve else plugin, llama: llama}
    vllm_cache = cache / "startup-vllm-cache"
    shutil.rmtree(vllm_cache, ignore_errors=True)
    plugin_env = dict(
        engine_environment(plugin, None, None),
        VLLM_CACHE_ROOT=str(vllm_cache),
        VLLM_ERNIE_MOE_REPACK_CACHE=str(vllm_cache / "ernie_moe_repack"),  # even if set outside
        TORCHINDUCTOR_CACHE_DIR=str(vllm_cache / "inductor"),  # else shared with earlier runs
    )
    llama_env = engine_environment(llama, None, args.llama_cpp_path)
    runs = [("plugin-cold", plugin, plugin_env)]
    round_runs = [("llama.cpp", llama, llama_env), ("plugin-warm", plugin, plugin_env)]
    if args.variant_env:
        variables = dict(setting.partition("=")[::2] for setting in args.variant_env)
        label = "-".join(f"{name}-{value}" for name, value in variables.items())
        variant_env = dict(plugin_env, **variables)
        # Its first start, outside the rounds: a variable in vLLM's compilation key (any vLLM
        # variable but a few) makes the variant compile once; the repacks are already stored.
        runs.append((f"plugin-first-{label}", plugin, variant_env))
        round_runs.append((f"plugin-warm-{label}", plugin, variant_env))
    runs += round_runs * args.rounds
    results: list[dict] = []
    for index, (label, engine, env) in enumerate(runs):
        out = cache / f"startup-{index}-{label}.json"
        if args.drop_page_cache:
            drop_page_cache()
        measured = run_child(__file__, task[engine], checkpoints[engine], out, env)
        results.append(dict(run=label, engine=task[engine], **measured))
        print(results[-1], flush=True)
    cached = sum(f.stat().st_size for f in vllm_cache.rglob("*") if f.is_file()) / 2**30
    answers = {json.dumps(r["greedy_tokens"]) for r in results if "greedy_tokens" in r}
    report = {
        "runs": results,
        "vllm_cache_gib": cached,
        "layers": args.layers,
        "page_cache_dropped_before_each_start": args.drop_page_cache,
        "plugin_starts_answer_the_same": len(answers) == 1,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
