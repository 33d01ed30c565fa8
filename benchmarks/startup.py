"""Start-up: seconds from a process's start to its first answered request, this plugin against
llama.cpp on the same weights, interleaved in one run.

The plugin starts once "cold" (an empty ``VLLM_CACHE_ROOT`` and Inductor cache: vLLM compiles the
model and the plugin repacks the weights, writing the caches) and then "warm" (the caches filled
by the cold start); llama.cpp has no such caches. Each start is a fresh process on the
checkpoints of ``bench_engines.py`` (``--layers 28``: the whole 21B-A3B); its request is a
32-token prompt answered with one token. Also recorded: peak memory (PSS) of the process tree
while starting; the vLLM engine's log (the phases of its start) in the .log next to each result;
each plugin start's greedy answer (16 tokens, after the clock stops): warm starts must answer as
the cold one did.

    python benchmarks/startup.py --layers 28 --int4-source w4a16 --engines w4a16-int8-head \\
        llama.cpp-q4_k_m --rounds 2 --cache /work/bench/cache --json out.json \\
        [--variant-env VLLM_ERNIE_MOE_FULL_WARMUP=1]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from bench_engines import (
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


def first_answer(engine: str, checkpoint: str) -> dict[str, float]:
    """In this fresh process: load ``engine``, answer one request; seconds since the process
    started."""
    import psutil

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
        metavar="NAME=VALUE",
        help="add a warm plugin start with this environment variable to each round (an A/B)",
    )
    parser.add_argument("--llama-cpp-path", help="a llama-cpp-python build to import")
    parser.add_argument("--llama-cpp-src")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[2]).write_text(json.dumps(first_answer(*args.child[:2])))
        return
    if not (args.engines and args.cache):
        parser.error("give --engines PLUGIN LLAMA_CPP and --cache")
    cache = Path(args.cache)
    plugin, llama = args.engines
    checkpoints = {
        e: engine_checkpoint(e, cache, args.layers, args.llama_cpp_src, args.int4_source)
        for e in args.engines
    }
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
        name, _, value = args.variant_env.partition("=")
        variant_env = dict(plugin_env, **{name: value})
        round_runs.append((f"plugin-warm-{name}-{value}", plugin, variant_env))
    runs += round_runs * args.rounds
    results: list[dict] = []
    for index, (label, engine, env) in enumerate(runs):
        out = cache / f"startup-{index}-{label}.json"
        measured = run_child(__file__, engine, checkpoints[engine], out, env)
        results.append(dict(run=label, engine=engine, **measured))
        print(results[-1], flush=True)
    cached = sum(f.stat().st_size for f in vllm_cache.rglob("*") if f.is_file()) / 2**30
    answers = {json.dumps(r["greedy_tokens"]) for r in results if "greedy_tokens" in r}
    report = {
        "runs": results,
        "vllm_cache_gib": cached,
        "layers": args.layers,
        "plugin_starts_answer_the_same": len(answers) == 1,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
