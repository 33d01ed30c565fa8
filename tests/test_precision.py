"""The precision tool's BoolQ protocol, checked against a direct transformers computation."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_ernie_moe.tools import cli
from vllm_ernie_moe.tools.precision import (
    BOOLQ_TASK,
    answer_token_ids,
    boolq_prompt,
    lm_eval_command,
    parse_args,
    read_boolq,
    single_token_answers,
    write_boolq_task,
)
from vllm_ernie_moe.tools.small_model import SMALL_MODEL_DIR

BOOLQ = Path(__file__).parent / "fixtures" / "boolq_small.jsonl"


def transformers_boolq(path: Path) -> list[str]:
    """The protocol computed directly: MindIE's rule (log-softmax at the last position, " yes" vs
    " no") where both answers are one token, else each answer's summed log-softmax over its own
    tokens (lm-eval's log-likelihood)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    def loglikelihood(prompt: str, answer: str) -> float:
        context, whole = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))

    yes, no = answer_token_ids(tokenizer)
    single = all(len(tokenizer.encode(a, add_special_tokens=False)) == 1 for a in (" yes", " no"))
    predictions = []
    with torch.no_grad():
        for item in read_boolq(BOOLQ):
            if single:
                ids = torch.tensor([tokenizer.encode(item.prompt)])
                logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                prefers_yes = logprobs[yes] > logprobs[no]
            else:
                prefers_yes = loglikelihood(item.prompt, " yes") > loglikelihood(item.prompt, " no")
            predictions.append("yes" if prefers_yes else "no")
    return predictions


@pytest.mark.parametrize("model", ["tiny-21b", "small-ernie"])
def test_boolq_cli_matches_transformers(checkpoint, tmp_path, model):
    """tiny-21b's tokenizer has " yes" and " no" as one token each (MindIE's rule); the shipped
    small model's splits them (the whole answer's log-likelihood)."""
    path = SMALL_MODEL_DIR if model == "small-ernie" else checkpoint(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert single_token_answers(tokenizer) == (model == "tiny-21b")
    out = tmp_path / "boolq.json"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.tools.precision", "boolq", "--model", str(path),
         "--data", str(BOOLQ), "--dtype", "float32", "--max-model-len", "512",
         "--enforce-eager", "--json", str(out)],
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
        [sys.executable, "-m", "vllm_ernie_moe.tools.precision", "boolq", "--model", "unused",
         "--data", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "bad.jsonl:1" in done.stderr and "Traceback" not in done.stderr


def test_lm_eval_mode_explains_a_missing_install():
    done = subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.tools.precision", "lm-eval", "--model", "m",
         "--tasks", "gsm8k"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "pip install 'lm-eval'" in done.stderr


def test_the_lm_eval_boolq_task_renders_mindies_prompt_and_answer(tmp_path):
    """The task YAML rendered as lm-eval renders it (Jinja): the same prompt as the BoolQ mode and
    the answer's choice index. ``make lm-eval`` runs lm-eval itself against vllm serve."""
    import jinja2

    write_boolq_task(BOOLQ, tmp_path)
    task = json.loads((tmp_path / f"{BOOLQ_TASK}.yaml").read_text())  # JSON is YAML
    assert task["dataset_kwargs"]["data_files"]["test"] == str(BOOLQ.resolve())
    records = [json.loads(line) for line in BOOLQ.read_text().splitlines() if line.strip()]
    assert {r["answer"] for r in records} == {True, False}
    for record in records:
        text = jinja2.Template(task["doc_to_text"]).render(**record)
        assert text == boolq_prompt(record)
        target = int(jinja2.Template(task["doc_to_target"]).render(**record))
        assert task["doc_to_choice"][target] == ("yes" if record["answer"] else "no")


def test_lm_eval_against_a_server_uses_local_completions(tmp_path):
    args, extra = parse_args(["lm-eval", "--model", "M", "--url", "http://127.0.0.1:9/",
                              "--boolq", str(BOOLQ), "--limit", "4"])  # fmt: skip
    command = lm_eval_command(args, extra, tmp_path)
    assert command[command.index("--model") + 1] == "local-completions"
    model_args = dict(kv.split("=") for kv in command[command.index("--model_args") + 1].split(","))
    assert model_args == {"model": "M", "base_url": "http://127.0.0.1:9/v1/completions",
                          "tokenizer": "M", "tokenized_requests": "False"}  # fmt: skip
    assert command[command.index("--tasks") + 1] == BOOLQ_TASK
    assert command[command.index("--include_path") + 1] == str(tmp_path)
    assert command[-2:] == ["--limit", "4"]


@pytest.mark.parametrize("flags", [[], ["--enforce-eager"]], ids=["compiled", "eager"])
def test_enforce_eager_reaches_the_engine_and_lm_evals_vllm(monkeypatch, tmp_path, flags):
    """The tools' tests above run eager (a faster start); the option must reach vLLM."""
    import vllm

    made = []

    def fake_llm(**options):
        made.append(options)
        return SimpleNamespace(
            llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=int))
        )

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    args, _ = parse_args(["boolq", "--model", "M", "--data", str(BOOLQ), *flags])
    with cli.engine(args):
        pass
    assert made == [dict(made[0], enforce_eager=bool(flags))]
    args, extra = parse_args(["lm-eval", "--model", "M", "--tasks", "gsm8k", *flags])
    command = lm_eval_command(args, extra, tmp_path)
    model_args = command[command.index("--model_args") + 1]
    assert ("enforce_eager=True" in model_args.split(",")) == bool(flags)
