"""lm-eval for real: its ``local-completions`` client against ``vllm serve`` with the plugin, on the
MindIE BoolQ protocol as a task from local files, checked item by item against
``python -m vllm_ernie_moe.tools.precision boolq`` (in-process vLLM) on the same items.

    make lm-eval          # builds .venv-lm-eval (lm-eval[api] 0.4.13), then runs this
    python benchmarks/lm_eval_boolq.py --lm-eval-python .venv-lm-eval/bin/python [--model DIR]

The items are the test fixture's 8 plus 56 generated ones (number comparisons, answers known).
Exits 1 when the two disagree on any item.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from vllm_ernie_moe.tools.served import vllm_serve
from vllm_ernie_moe.tools.small_model import SMALL_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "lm-eval"
FIXTURE = REPO / "tests" / "fixtures" / "boolq_small.jsonl"
MAX_MODEL_LEN = 512


def write_items(path: Path, generated: int = 56) -> list[dict]:
    rng = random.Random(0)
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    for _ in range(generated):
        a, b = rng.sample(range(1, 100), 2)
        items.append({"title": "Numbers", "passage": f"The numbers are {a} and {b}.",
                      "question": f"is {a} larger than {b}", "answer": a > b})  # fmt: skip
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return items


def precision(*args: str) -> None:
    command = [sys.executable, "-m", "vllm_ernie_moe.tools.precision", *args]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def lm_eval_predictions(output_dir: Path) -> tuple[float, list[str]]:
    """lm-eval's acc and its choice per item, from ``--log_samples`` (doc order)."""
    (results,) = output_dir.rglob("results_*.json")
    (samples,) = output_dir.rglob("samples_boolq_mindie_*.jsonl")
    acc = json.loads(results.read_text())["results"]["boolq_mindie"]["acc,none"]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()),
                  key=lambda row: row["doc_id"])  # fmt: skip
    choice = [max(range(2), key=lambda i: float(row["filtered_resps"][i][0])) for row in rows]
    return acc, ["yes" if c == 0 else "no" for c in choice]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMALL_MODEL_DIR))
    parser.add_argument("--lm-eval-python", required=True, help="a Python with lm-eval[api]")
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "lm-eval-boolq.json"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / "boolq.jsonl"
    items = write_items(data)
    engine = ["--model", args.model, "--max-model-len", str(MAX_MODEL_LEN)]
    precision("boolq", *engine, "--data", str(data), "--json", str(OUT / "precision.json"))
    mindie = json.loads((OUT / "precision.json").read_text())["files"][data.name]

    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the task reads local files only
    serve_args = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    with vllm_serve(args.model, *serve_args, log=OUT / "server.log") as server:
        precision("lm-eval", "--model", args.model, "--url", server.base_url, "--boolq",
                  str(data), "--lm-eval-python", args.lm_eval_python, "--log_samples",
                  "--output_path", str(OUT / "lm-eval"))  # fmt: skip
    acc, predictions = lm_eval_predictions(OUT / "lm-eval")

    disagree = [i for i, (a, b) in enumerate(zip(predictions, mindie["predictions"])) if a != b]
    result = {
        "model": Path(args.model).name,
        "items": len(items),
        "lm_eval_acc": acc,
        "precision_boolq_accuracy": mindie["accuracy"],
        "items_where_they_disagree": disagree,
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if disagree or abs(acc - mindie["accuracy"]) > 1e-9 else 0


if __name__ == "__main__":
    sys.exit(main())
