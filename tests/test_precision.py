"""The precision tool's BoolQ protocol, checked against a direct transformers computation."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_ernie_moe.precision import answer_token_ids, read_boolq

BOOLQ = Path(__file__).parent / "fixtures" / "boolq_small.jsonl"


def transformers_boolq(path: Path) -> list[str]:
    """MindIE's rule computed directly: log-softmax at the last position, " yes" vs " no"."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    yes, no = answer_token_ids(tokenizer)
    predictions = []
    with torch.no_grad():
        for item in read_boolq(BOOLQ):
            ids = torch.tensor([tokenizer.encode(item.prompt)])
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            predictions.append("yes" if logprobs[yes] > logprobs[no] else "no")
    return predictions


def test_boolq_cli_matches_transformers(checkpoint, tmp_path):
    path = checkpoint("tiny-21b")
    out = tmp_path / "boolq.json"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.precision", "boolq", "--model", str(path),
         "--data", str(BOOLQ), "--dtype", "float32", "--max-model-len", "512",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "total" in done.stdout and "boolq_small.jsonl" in done.stdout
    results = json.loads(out.read_text())
    got = results["files"]["boolq_small.jsonl"]
    expected = transformers_boolq(path)
    assert got["predictions"] == expected
    answers = ["yes" if item.answer else "no" for item in read_boolq(BOOLQ)]
    correct = sum(p == a for p, a in zip(expected, answers))
    assert got["correct"] == correct and results["total"]["accuracy"] == correct / len(answers)


def test_bad_data_is_reported_before_any_engine_starts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "answer": "maybe"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.precision", "boolq", "--model", "unused",
         "--data", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "bad.jsonl:1" in done.stderr and "Traceback" not in done.stderr


def test_lm_eval_mode_explains_a_missing_install():
    done = subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.precision", "lm-eval", "--model", "m",
         "--tasks", "gsm8k"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "pip install 'lm-eval'" in done.stderr
