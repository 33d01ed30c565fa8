"""vLLM's own load client against the plugin's server: ``vllm bench serve`` (random dataset) at
several request rates on the 4-layer ERNIE-4.5-21B-A3B geometry, then the MindIE-style perf tool
(``python -m vllm_ernie_moe.tools.perf``) on the same (input, output) case, offline, for comparison.

    python benchmarks/bench_serve.py [--quantized] [--rates 0.5 1 2 inf] [--prompts 16]
    python benchmarks/bench_serve.py --checkpoint benchmarks/out/21b-28layers-w4a8 --rates inf

The server's start-up time (``vllm serve`` until /health answers) and peak memory (the sum of
its processes' peak RSS, ``VmHWM``) are reported too.

Results: benchmarks/out/serve/*.json and a markdown table on stdout (docs/benchmarks.md). The
server and the offline engine run one after the other, not interleaved: compare their numbers as
two views of one host, not as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_engines import BENCH_ENV, REPO, checkpoint_paths

from vllm_ernie_moe.tools.served import VLLM_CLI, vllm_serve

OUT = REPO / "benchmarks" / "out" / "serve"
MAX_MODEL_LEN = 2048


def bench_serve(
    server, tokenizer: str, rate: str, args: argparse.Namespace, prompts: int | None = None
) -> dict:
    name = f"rate-{rate}.json"
    command = [
        str(VLLM_CLI), "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
        "--model", server.model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(prompts or args.prompts), "--request-rate", rate, "--ignore-eos",
        "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", str(OUT),
        "--result-filename", name, "--disable-tqdm",
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((OUT / name).read_text())


def perf_tool(model: Path, args: argparse.Namespace) -> list[dict]:
    out = OUT / "perf.json"
    command = [
        sys.executable, "-m", "vllm_ernie_moe.tools.perf", "--model", str(model),
        "--cases", f"[[{args.input_len},{args.output_len}]]", "--batch-sizes", "1", "8",
        "--json", str(out),
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def peak_rss_gib(pid: int) -> float:
    """The peak resident memory of process ``pid`` and its children, summed (``VmHWM``)."""
    import psutil

    root = psutil.Process(pid)
    total_kib = 0
    for process in (root, *root.children(recursive=True)):
        status = Path(f"/proc/{process.pid}/status").read_text()
        total_kib += int(status.split("VmHWM:")[1].split()[0])
    return total_kib / 2**20


def markdown(runs: dict[str, dict], perf: list[dict], server: dict) -> str:
    lines = [
        f"server start-up {server['startup_s']:.0f} s, peak RSS {server['peak_rss_gib']:.2f} GiB",
        "",
        "| request rate (req/s) | completed | failed | output tok/s | mean TTFT ms | p99 TTFT ms "
        "| mean TPOT ms | p99 TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate, r in runs.items():
        lines.append(
            f"| {rate} | {r['completed']} | {r.get('failed', 0)} | {r['output_throughput']:.1f} "
            f"| {r['mean_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} "
            f"| {r['p99_tpot_ms']:.1f} |"
        )
    lines += [
        "",
        "| perf tool, batch | first token ms | non-first token ms | output tok/s |",
        "|---|---|---|---|",
    ]
    for case in perf:
        lines.append(
            f"| {case['batch_size']} | {1000 * case['first_token_s']:.0f} "
            f"| {case['non_first_token_ms']:.1f} | {case['throughput_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantized", action="store_true", help="serve the W8A8_DYNAMIC copy")
    parser.add_argument("--checkpoint", type=Path, help="serve this one instead (e.g. 28 layers)")
    parser.add_argument("--rates", nargs="+", default=["0.5", "1", "2", "inf"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    bf16, w8a8 = checkpoint_paths(REPO / "benchmarks" / "out")
    model = args.checkpoint or (w8a8 if args.quantized else bf16)
    serve_args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"]
    start = time.perf_counter()
    with vllm_serve(model, *serve_args, log=OUT / "server.log", start_timeout=1800) as server:
        started = {
            "startup_s": time.perf_counter() - start,
            "peak_rss_gib": peak_rss_gib(server.pid),
        }
        bench_serve(server, str(model), "inf", args, prompts=8)  # warm-up: compiles the shapes
        runs = {rate: bench_serve(server, str(model), rate, args) for rate in args.rates}
    perf = perf_tool(model, args)
    failed = sum(r.get("failed", 0) for r in runs.values())
    table = markdown(runs, perf, started)
    print(table)
    (OUT / "table.md").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    for name, value in BENCH_ENV.items():  # the other benchmarks' engine settings
        os.environ.setdefault(name, value)
    sys.exit(main())
