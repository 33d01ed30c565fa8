"""How cost grows: decode against context and batch, prefill against prompt length, TP=2 against
TP=1, memory against model size. One run, engines one after another on the same cores.

Checkpoints: the 21B-geometry checkpoints of bench_engines.py (4 layers) and, for the memory
curve, the same geometry with 2 and 3 layers (built once). Engines: the plugin in bf16 and in
W8A8_DYNAMIC with the int8 lm_head (``VLLM_ERNIE_MOE_INT8_LM_HEAD=1``).

    python benchmarks/scaling.py                    # writes docs/scaling/*.png and scaling.md

Every timed run uses new random prompts (vLLM's prefix cache would serve repeated ones), except
decode, which is timed as (64 tokens - 1 token) on the same prompts: there the cache keeps the
prefill out of both runs.
"""

import argparse
import json
from pathlib import Path

from bench_engines import (
    REPO,
    PeakMemory,
    checkpoint_paths,
    random_prompts,
    run_child,
    timed_vllm_generate,
    tree_pss_gib,
)

CONTEXTS = (128, 512, 2048, 8192)
BATCHES = (1, 4, 16, 64)
PROMPTS = (128, 512, 2048, 8192)
LAYERS = (2, 3, 4)
DECODE = 32
VOCAB = 100000
ENGINES = {
    "bf16": ("bf16", {}),
    "w8a8": ("w8a8", {"VLLM_ERNIE_MOE_INT8_LM_HEAD": "1"}),
}
SEEDS = iter(range(100, 10**6))


def _engine(checkpoint: str, tp: int, max_len: int, seqs: int):
    from vllm import LLM

    memory = PeakMemory()
    llm = LLM(
        model=checkpoint,
        dtype="bfloat16",
        tensor_parallel_size=tp,
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=max(max_len, 2048),
    )
    peak = memory.stop()
    return llm, peak


def decode_rate(llm, batch: int, context: int) -> float:
    prompts = random_prompts(batch, context, VOCAB, next(SEEDS))
    timed_vllm_generate(llm, prompts, 1)  # fills the prefix cache
    first = timed_vllm_generate(llm, prompts, 1)
    full = timed_vllm_generate(llm, prompts, DECODE)
    return batch * (DECODE - 1) / (full - first)


def prefill_rate(llm, length: int) -> float:
    return length / min(
        timed_vllm_generate(llm, random_prompts(1, length, VOCAB, next(SEEDS)), 1) for _ in range(2)
    )


def child(task: str, checkpoint: str, out: str) -> None:
    if task == "sweeps":
        llm, peak = _engine(checkpoint, 1, max(CONTEXTS) + DECODE + 16, max(BATCHES))
        timed_vllm_generate(llm, random_prompts(1, 32, VOCAB, 1), 4)  # warm-up
        result = {
            "context": {c: decode_rate(llm, 1, c) for c in CONTEXTS},
            "batch": {b: decode_rate(llm, b, 128) for b in BATCHES},
            "prefill": {n: prefill_rate(llm, n) for n in PROMPTS},
        }
    elif task.startswith("tp"):
        llm, peak = _engine(checkpoint, int(task[2:]), 2048, 8)
        timed_vllm_generate(llm, random_prompts(1, 32, VOCAB, 1), 4)
        result = {
            "bs1": decode_rate(llm, 1, 128),
            "bs8": decode_rate(llm, 8, 128),
            "prefill_1024": prefill_rate(llm, 1024),
        }
    else:  # memory
        llm, peak = _engine(checkpoint, 1, 2048, 8)
        result = {}
    result.update(peak_load_pss_gib=peak, serving_pss_gib=tree_pss_gib())
    Path(out).write_text(json.dumps(result))


def line_chart(path: Path, title: str, x_label: str, y_label: str, series: dict) -> None:
    """A small line chart (log2 x axis) with PIL: series name -> {x: y}."""
    import math

    from PIL import Image, ImageDraw

    width, height, left, bottom, top, right = 720, 440, 70, 60, 50, 170
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    xs = sorted({float(x) for points in series.values() for x in points})
    y_max = 1.15 * max(y for points in series.values() for y in points.values())
    x_of = {
        x: left + (width - left - right) * (math.log2(x / xs[0]) / math.log2(xs[-1] / xs[0]))
        for x in xs
    }

    def y_of(y: float) -> float:
        return height - bottom - (height - bottom - top) * y / y_max

    draw.line((left, height - bottom, width - right, height - bottom), fill="black")
    draw.line((left, top, left, height - bottom), fill="black")
    for x in xs:
        draw.text((x_of[x] - 10, height - bottom + 6), f"{x:g}", fill="black")
    for k in range(5):
        y = y_max * k / 4
        draw.text((5, y_of(y) - 6), f"{y:.0f}", fill="black")
    draw.text((left + 150, height - 25), x_label, fill="black")
    draw.text((5, top - 20), y_label, fill="black")
    colours = [(40, 90, 180), (200, 80, 40), (40, 150, 70), (120, 60, 160)]
    for n, (name, points) in enumerate(series.items()):
        colour = colours[n % len(colours)]
        coords = [(x_of[float(x)], y_of(y)) for x, y in sorted(points.items(), key=lambda p: p[0])]
        draw.line(coords, fill=colour, width=3)
        for cx, cy in coords:
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
        draw.text((width - right + 10, top + 18 * n), name, fill=colour)
    image.save(path)


def report(results: dict, out_dir: Path) -> str:
    """Markdown tables and PNG charts of one run."""
    sweeps = {name: results[f"sweeps-{name}"] for name in ENGINES}
    labels = {"bf16": "bf16", "w8a8": "W8A8 + int8 lm_head"}
    rows = []
    for key, title, x_label in (
        ("context", "bs=1 decode tok/s against context length", "context tokens"),
        ("batch", "decode tok/s (all sequences) against batch size, context 128", "batch"),
        ("prefill", "prefill tok/s against prompt length", "prompt tokens"),
    ):
        series = {labels[n]: {int(x): y for x, y in s[key].items()} for n, s in sweeps.items()}
        line_chart(out_dir / f"{key}.png", title, x_label, "tok/s", series)
        xs = list(next(iter(series.values())))
        rows += [f"## {title}", "", f"![{key}]({key}.png)", ""]
        rows += ["| engine | " + " | ".join(map(str, xs)) + " |", "|---" * (len(xs) + 1) + "|"]
        rows += [
            f"| {n} | " + " | ".join(f"{p[x]:.1f}" for x in xs) + " |" for n, p in series.items()
        ]
        rows.append("")
    rows += ["## TP=2 against TP=1 (bf16, 2 cores)", "", "![tp](tp.png)", ""]
    rows += [
        "| | bs=1 decode tok/s | bs=8 decode tok/s | prefill 1024 tok/s |",
        "|---|---|---|---|",
    ]
    for tp in (1, 2):
        r = results[f"tp{tp}-bf16"]
        rows.append(f"| TP={tp} | {r['bs1']:.1f} | {r['bs8']:.1f} | {r['prefill_1024']:.0f} |")
    tp_series = {
        f"TP={tp} decode": {1: results[f"tp{tp}-bf16"]["bs1"], 8: results[f"tp{tp}-bf16"]["bs8"]}
        for tp in (1, 2)
    }
    line_chart(out_dir / "tp.png", "bf16 decode tok/s, TP=1 and TP=2", "batch", "tok/s", tp_series)
    rows.append("")
    memory = {
        labels[n]: {layers: results[f"memory-{n}-{layers}"]["serving_pss_gib"] for layers in LAYERS}
        for n in ENGINES
    }
    line_chart(out_dir / "memory.png", "serving memory (PSS GiB) against layers", "layers", "GiB",
               memory)  # fmt: skip
    rows += ["## Memory against model size", "", "![memory](memory.png)", ""]
    rows += [
        "| engine | layers | serving PSS GiB | peak PSS while loading GiB |",
        "|---|---|---|---|",
    ]
    for n in ENGINES:
        for layers in LAYERS:
            r = results[f"memory-{n}-{layers}"]
            rows.append(
                f"| {labels[n]} | {layers} | {r['serving_pss_gib']:.2f} "
                f"| {r['peak_load_pss_gib']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--out", default=str(REPO / "docs" / "scaling"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache, out_dir = Path(args.cache), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {
        layers: dict(zip(("bf16", "w8a8"), checkpoint_paths(cache, layers), strict=True))
        for layers in LAYERS
    }
    results = {}
    for name, (kind, env) in ENGINES.items():
        results[f"sweeps-{name}"] = run_child(
            __file__, "sweeps", sizes[4][kind], cache / f"s-{name}.json", env
        )
    for tp, env in ((1, {}), (2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})):
        path = cache / f"s-tp{tp}.json"
        results[f"tp{tp}-bf16"] = run_child(__file__, f"tp{tp}", sizes[4]["bf16"], path, env)
    for name, (kind, env) in ENGINES.items():
        for layers in LAYERS:
            path = cache / f"s-mem-{name}-{layers}.json"
            results[f"memory-{name}-{layers}"] = run_child(
                __file__, "memory", sizes[layers][kind], path, env
            )
    (cache / "scaling.json").write_text(json.dumps(results, indent=2))
    markdown = report(results, out_dir)
    title = "# Scaling (benchmarks/scaling.py, one run; explained in ../benchmarks.md)\n\n"
    (out_dir / "scaling.md").write_text(title + markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
