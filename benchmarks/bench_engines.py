"""Side-by-side speed of this plugin, vLLM's built-in ERNIE class and transformers, in one run.

Checkpoint: the exact ERNIE-4.5-21B-A3B geometry with 4 layers (dense layer 0 + 3 MoE layers),
random bf16 weights with a random router (built once and cached), and its W8A8_DYNAMIC version
written by ``vllm_ernie_moe.quantize``. Each engine runs in its own subprocess on the same cores;
rows: bs=1 decode (128 in / 64 out), bs=8 decode, 1024-token prefill; for vLLM also engine load
time and peak memory while loading (PSS of the benchmark process and its engine/worker children,
sampled every 0.1 s; serving adds only the fixed 1 GiB KV cache, already allocated at load).

    python benchmarks/bench_engines.py            # all engines, writes docs/benchmarks.md's table
    python benchmarks/bench_engines.py --engines plugin builtin --json out.json

Decode tok/s = generated tokens after the first / (time for 64 tokens - time for 1 token).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = {
    "plugin": "vLLM + vllm-ernie-moe, bf16",
    "builtin": "vLLM 0.32 built-in class, bf16",
    "transformers": "transformers (eager), bf16",
    "w8a8": "vLLM + vllm-ernie-moe, W8A8_DYNAMIC",
}
PROMPT_LEN, DECODE_LEN, PREFILL_LEN, BATCH = 128, 64, 1024, 8
# Same cores for every engine: vLLM otherwise reserves one of two cores for its front end.
# A 1 GiB KV cache holds 8 x 2048 tokens of this 4-layer model many times over.
BENCH_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def measure(generate) -> dict[str, float]:
    """generate(prompts, max_tokens) -> None; returns the three rows in tok/s."""
    vocab = 100000
    one = random_prompts(1, PROMPT_LEN, vocab, 0)
    batch = random_prompts(BATCH, PROMPT_LEN, vocab, 1)
    long = random_prompts(1, PREFILL_LEN, vocab, 2)
    generate(random_prompts(1, 32, vocab, 3), 4)  # warm-up

    def timed(prompts, tokens) -> float:
        start = time.perf_counter()
        generate(prompts, tokens)
        return time.perf_counter() - start

    def decode_rate(prompts) -> float:
        first = min(timed(prompts, 1) for _ in range(2))
        full = min(timed(prompts, DECODE_LEN) for _ in range(2))
        return len(prompts) * (DECODE_LEN - 1) / (full - first)

    return {
        "bs1_decode_tok_s": decode_rate(one),
        "bs8_decode_tok_s": decode_rate(batch),
        "prefill_1024_tok_s": PREFILL_LEN / min(timed(long, 1) for _ in range(2)),
    }


class PeakMemory:
    """Samples the memory of this process and its children (engine, workers) as PSS, which counts
    pages shared between them (libraries, the safetensors mmap) once, not once per process."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self.running = 0, True
        me = psutil.Process()

        def sample() -> None:
            while self.running:
                try:
                    procs = [me, *me.children(recursive=True)]
                    self.peak = max(self.peak, sum(p.memory_full_info().pss for p in procs))
                except psutil.Error:
                    pass
                time.sleep(0.1)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**30


def run_vllm(checkpoint: str) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    memory = PeakMemory()
    start = time.perf_counter()
    llm = LLM(model=checkpoint, dtype="bfloat16", max_model_len=2048, max_num_seqs=BATCH)
    load_s = time.perf_counter() - start
    peak_pss_gib = memory.stop()  # sampling PSS costs CPU: never during the timed runs

    def generate(prompts, tokens):
        params = SamplingParams(
            max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True
        )
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    return dict(measure(generate), load_s=load_s, peak_pss_gib=peak_pss_gib)


def run_transformers(checkpoint: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)

    def generate(prompts, tokens):
        ids = torch.tensor(prompts)
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return measure(generate)


def child(engine: str, checkpoint: str, out: str) -> None:
    """One engine's measurements, in a fresh process."""
    result = run_transformers(checkpoint) if engine == "transformers" else run_vllm(checkpoint)
    Path(out).write_text(json.dumps(result))


def checkpoint_paths(cache: Path) -> tuple[Path, Path]:
    """The BF16 checkpoint and its W8A8_DYNAMIC (msModelSlim format) version, built once."""
    from vllm_ernie_moe.quantize import quantize_checkpoint
    from vllm_ernie_moe.random_checkpoint import build_checkpoint

    bf16, w8a8 = cache / "21b-4layers-bf16", cache / "21b-4layers-w8a8"
    if not (bf16 / "config.json").exists():
        print(f"building the 21B-geometry 4-layer checkpoint in {bf16} ...", flush=True)
        build_checkpoint(bf16, "21b-4layers", dtype="bfloat16")
    if not w8a8.exists():
        quantize_checkpoint(bf16, w8a8)
    return bf16, w8a8


SPEED_KEYS = ("bs1_decode_tok_s", "bs8_decode_tok_s", "prefill_1024_tok_s")


def best_of(old: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    """Per metric the better of two rounds: higher speed, shorter load, lower memory."""
    if old is None:
        return new
    return {k: max(old[k], new[k]) if k in SPEED_KEYS else min(old[k], new[k]) for k in new}


def _ratio_row(results: dict, a: str, b: str, keys: tuple[str, ...]) -> list[str]:
    if a not in results or b not in results:
        return []
    ratios = ", ".join(f"{k} {results[a][k] / results[b][k]:.2f}" for k in keys)
    return ["", f"ratio {a} / {b}: {ratios}"]


def markdown(results: dict[str, dict[str, float]]) -> str:
    rows = [
        "| engine (2 cores) | bs=1 decode tok/s | bs=8 decode tok/s | prefill 1024 tok/s |",
        "|---|---|---|---|",
    ]
    for engine, r in results.items():
        rows.append(
            f"| {ENGINES[engine]} | {r['bs1_decode_tok_s']:.1f} | {r['bs8_decode_tok_s']:.1f} "
            f"| {r['prefill_1024_tok_s']:.0f} |"
        )
    rows.extend(_ratio_row(results, "plugin", "builtin", SPEED_KEYS))
    rows += ["", "| engine | load s | peak PSS GiB |", "|---|---|---|"]
    for engine in ("plugin", "w8a8"):
        if engine in results:
            r = results[engine]
            rows.append(f"| {ENGINES[engine]} | {r['load_s']:.0f} | {r['peak_pss_gib']:.2f} |")
    rows.extend(_ratio_row(results, "w8a8", "plugin", (*SPEED_KEYS, "load_s", "peak_pss_gib")))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--cache", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every engine this often, keep each one's best"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("ENGINE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.cache)
    bf16, w8a8 = checkpoint_paths(cache)
    results: dict[str, dict[str, float]] = {}
    for engine in args.engines * args.rounds:
        out = cache / f"{engine}.json"
        env = dict(os.environ, **BENCH_ENV)
        if engine == "builtin":
            env["VLLM_PLUGINS"] = "none"  # load no general plugin: vLLM's own ERNIE class
        print(f"running {engine} ...", flush=True)
        log = cache / f"{engine}.log"
        with log.open("w") as sink:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    engine,
                    str(w8a8 if engine == "w8a8" else bf16),
                    str(out),
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        if done.returncode:
            sys.exit(f"{engine} failed; its log is {log}")
        results[engine] = best_of(results.get(engine), json.loads(out.read_text()))
        print(engine, results[engine], flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
