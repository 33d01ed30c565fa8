"""Side-by-side speed of this plugin, vLLM's built-in ERNIE class and transformers, in one run.

Checkpoint: the exact ERNIE-4.5-21B-A3B geometry with 4 layers (dense layer 0 + 3 MoE layers),
random bf16 weights with a random router (built once and cached). Each engine runs in its own
subprocess on the same cores; rows: bs=1 decode (128 in / 64 out), bs=8 decode, 1024-token prefill.

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
    "plugin": "vLLM + vllm-ernie-moe",
    "builtin": "vLLM 0.32 built-in class",
    "transformers": "transformers (eager, bf16)",
}
PROMPT_LEN, DECODE_LEN, PREFILL_LEN, BATCH = 128, 64, 1024, 8
# Same cores for every engine: vLLM otherwise reserves one of two cores for its front end.
BENCH_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}


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


def run_vllm(checkpoint: str) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=checkpoint, dtype="bfloat16", max_model_len=2048, max_num_seqs=BATCH)

    def generate(prompts, tokens):
        params = SamplingParams(
            max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True
        )
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    return measure(generate)


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
    result = run_transformers(checkpoint) if engine == "transformers" else run_vllm(checkpoint)
    Path(out).write_text(json.dumps(result))


def checkpoint_path(cache: Path) -> Path:
    from vllm_ernie_moe.random_checkpoint import build_checkpoint

    path = cache / "21b-4layers-bf16"
    if not (path / "config.json").exists():
        print(f"building the 21B-geometry 4-layer checkpoint in {path} ...", flush=True)
        build_checkpoint(path, "21b-4layers", dtype="bfloat16")
    return path


def markdown(results: dict[str, dict[str, float]]) -> str:
    rows = [
        "| engine (2 cores, bf16) | bs=1 decode tok/s | bs=8 decode tok/s | prefill 1024 tok/s |",
        "|---|---|---|---|",
    ]
    for engine, r in results.items():
        rows.append(
            f"| {ENGINES[engine]} | {r['bs1_decode_tok_s']:.1f} | {r['bs8_decode_tok_s']:.1f} "
            f"| {r['prefill_1024_tok_s']:.0f} |"
        )
    if "plugin" in results and "builtin" in results:
        p, b = results["plugin"], results["builtin"]
        rows.append(
            "| ratio plugin / built-in | " + " | ".join(f"{p[k] / b[k]:.2f}" for k in p) + " |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--cache", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--child", nargs=3, metavar=("ENGINE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.cache)
    checkpoint = checkpoint_path(cache)
    results: dict[str, dict[str, float]] = {}
    for engine in args.engines:
        out = cache / f"{engine}.json"
        env = dict(os.environ, **BENCH_ENV)
        if engine == "builtin":
            env["VLLM_PLUGINS"] = "none"  # load no general plugin: vLLM's own ERNIE class
        print(f"running {engine} ...", flush=True)
        log = cache / f"{engine}.log"
        with log.open("w") as sink:
            done = subprocess.run(
                [sys.executable, __file__, "--child", engine, str(checkpoint), str(out)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        if done.returncode:
            sys.exit(f"{engine} failed; its log is {log}")
        results[engine] = json.loads(out.read_text())
        print(engine, results[engine], flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
