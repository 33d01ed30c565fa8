"""Precision tests on vLLM: MindIE's BoolQ protocol, and lm-eval for other tasks.

    python -m vllm_ernie_moe.tools.precision boolq --model M --data boolq_dir_or.jsonl [--tp 2]
    python -m vllm_ernie_moe.tools.precision lm-eval --model M --tasks gsm8k,ceval-valid [--tp 2]
    python -m vllm_ernie_moe.tools.precision lm-eval --model M --url http://127.0.0.1:8000 \
        [--boolq data.jsonl] [--tasks ...] [--lm-eval-python OTHER_VENV/bin/python]

BoolQ (MindIE ``modeltest full_BoolQ``): each JSONL line has ``question``, ``passage``, ``title``
and ``answer`` (true/false). The prompt is
``"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"``; one forward step; the answer is
" yes" when its log-probability at the last position beats " no"'s (the token ids are the last
tokens of ": yes" / ": no", encoded without special tokens). Where the tokenizer splits " yes" or
" no" into several tokens, the whole answer's log-likelihood decides, as in lm-eval. Accuracy per
file and in total.

lm-eval runs in-process on vLLM (``--model vllm``), or with ``--url`` against a running
``vllm serve`` (``--model local-completions``, so lm-eval may live in a venv of its own).
``--boolq FILE`` adds the same BoolQ protocol as the lm-eval task ``boolq_mindie``.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vllm_ernie_moe import envs
from vllm_ernie_moe.tools.cli import add_engine_arguments, check_engine_arguments, command, engine


@dataclass
class BoolQItem:
    prompt: str
    answer: bool


def boolq_prompt(item: dict) -> str:
    return f"{item['title']} -- {item['passage']}\nQuestion: {item['question']}?\nAnswer:"


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ValueError(f"{where}: answer must be true or false, got {value!r}")


def read_boolq(path: Path) -> list[BoolQItem]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            items.append(BoolQItem(boolq_prompt(record), _as_bool(record["answer"], where)))
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(
                f"{where}: not a BoolQ record ({error}); need question, passage, title, answer"
            ) from None
    return items


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of " yes" and " no" as the last tokens of ": yes" / ": no" (MindIE's rule)."""
    yes = tokenizer.encode(": yes", add_special_tokens=False)[-1]
    no = tokenizer.encode(": no", add_special_tokens=False)[-1]
    return yes, no


def single_token_answers(tokenizer) -> bool:
    """Whether " yes" and " no" are one token each (ERNIE's tokenizer): then MindIE's rule, one
    next-token comparison, is the whole answer."""
    return all(len(tokenizer.encode(a, add_special_tokens=False)) == 1 for a in (" yes", " no"))


def answer_continuation(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """(tokens of ``prompt + answer``, how many of them are the answer's), split as lm-eval does:
    the whole text's tokens past the prompt's."""
    context = tokenizer.encode(prompt)
    whole = tokenizer.encode(prompt + answer)
    return whole, len(whole) - len(context)


def boolq_predictions(llm, items: list[BoolQItem]) -> list[bool]:
    """True where the model prefers " yes". MindIE's rule (greedy over the two answer tokens) where
    each answer is one token; else the larger log-likelihood of the whole answer, as lm-eval
    scores it (a tokenizer that splits " yes" leaves MindIE's last-token rule comparing word
    pieces)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    limit = llm.llm_engine.model_config.max_model_len - 1
    if single_token_answers(tokenizer):
        yes, no = answer_token_ids(tokenizer)
        prompts = [
            TokensPrompt(prompt_token_ids=tokenizer.encode(item.prompt)[-limit:]) for item in items
        ]
        params = SamplingParams(max_tokens=1, temperature=0, allowed_token_ids=[yes, no])
        outputs = llm.generate(prompts, params)
        return [output.outputs[0].token_ids[0] == yes for output in outputs]
    scored = [
        answer_continuation(tokenizer, item.prompt, a) for item in items for a in (" yes", " no")
    ]
    prompts = [TokensPrompt(prompt_token_ids=whole[-limit:]) for whole, _ in scored]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))

    def loglikelihood(output, answer_length: int) -> float:
        ids, logprobs = output.prompt_token_ids, output.prompt_logprobs
        return sum(logprobs[i][ids[i]].logprob for i in range(len(ids) - answer_length, len(ids)))

    scores = [loglikelihood(o, n) for o, (_, n) in zip(outputs, scored)]
    return [scores[2 * i] > scores[2 * i + 1] for i in range(len(items))]


def run_boolq(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    files = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
    if not files:
        raise SystemExit(f"{data}: no *.jsonl files")
    per_file = {f: read_boolq(f) for f in files}
    with engine(args) as llm:
        predictions_per_file = {f: boolq_predictions(llm, items) for f, items in per_file.items()}
    results, correct_total, count_total = {}, 0, 0
    print(f"\n{'file':<40} {'items':>6} {'correct':>8} {'accuracy':>9}")
    for file, items in per_file.items():
        predictions = predictions_per_file[file]
        correct = sum(p == item.answer for p, item in zip(predictions, items))
        results[file.name] = {
            "items": len(items),
            "correct": correct,
            "accuracy": correct / len(items),
            "predictions": ["yes" if p else "no" for p in predictions],
        }
        correct_total, count_total = correct_total + correct, count_total + len(items)
        print(f"{file.name:<40} {len(items):>6} {correct:>8} {correct / len(items):>9.4f}")
    total = {
        "items": count_total,
        "correct": correct_total,
        "accuracy": correct_total / count_total,
    }
    print(f"{'total':<40} {count_total:>6} {correct_total:>8} {total['accuracy']:>9.4f}")
    return {"files": results, "total": total}


BOOLQ_TASK = "boolq_mindie"


def write_boolq_task(data: Path, include_dir: Path) -> None:
    """An lm-eval task for a BoolQ JSONL with MindIE's prompt: a choice between " yes" and " no"
    after the prompt (lm-eval's loglikelihood of each continuation, acc = the likelier one)."""
    task = {
        "task": BOOLQ_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{title}} -- {{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_choice": ["yes", "no"],
        "doc_to_target": "{{ 0 if answer | string | lower == 'true' else 1 }}",
        "metric_list": [{"metric": "acc"}],
    }
    # JSON is YAML: no YAML writer needed.
    (include_dir / f"{BOOLQ_TASK}.yaml").write_text(json.dumps(task, indent=2))


def lm_eval_command(args: argparse.Namespace, extra: list[str], include_dir: Path) -> list[str]:
    if args.url:
        model_args = (
            f"model={args.model},base_url={args.url.rstrip('/')}/v1/completions,"
            f"tokenizer={args.model},tokenized_requests=False"
        )
        backend = ["--model", "local-completions", "--model_args", model_args]
    else:
        model_args = (
            (
                f"pretrained={args.model},tensor_parallel_size={args.tp},dtype={args.dtype},"
                f"max_model_len={args.max_model_len},trust_remote_code={args.trust_remote_code}"
            )
            + (f",quantization={args.quantization}" if args.quantization else "")
            + (",enforce_eager=True" if args.enforce_eager else "")
        )
        backend = ["--model", "vllm", "--model_args", model_args, "--batch_size", "auto"]
    tasks = ",".join(filter(None, [args.tasks, BOOLQ_TASK if args.boolq else None]))
    include = ["--include_path", str(include_dir)] if args.boolq else []
    return [args.lm_eval_python, "-m", "lm_eval", *backend, "--tasks", tasks, *include, *extra]


def run_lm_eval(args: argparse.Namespace, extra: list[str]) -> int:
    found = subprocess.run(
        [args.lm_eval_python, "-c", "import lm_eval"], capture_output=True
    ).returncode == 0  # fmt: skip
    if not found:
        where = "this environment" if args.lm_eval_python == sys.executable else args.lm_eval_python
        raise SystemExit(
            f"lm-eval is not installed in {where}: pip install 'lm-eval' (in-process it uses "
            "this environment's vLLM and the plugin; with --url, pip install 'lm-eval[api]' "
            "anywhere and pass --lm-eval-python), then run this command again."
        )
    envs.use_all_cpu_cores()
    with tempfile.TemporaryDirectory(prefix="lm-eval-tasks-") as include_dir:
        if args.boolq:
            write_boolq_task(Path(args.boolq), Path(include_dir))
        command = lm_eval_command(args, extra, Path(include_dir))
        print(" ".join(command), flush=True)
        return subprocess.call(command)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_ernie_moe.tools.precision", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    for name, help_text in (
        ("boolq", "MindIE's BoolQ protocol"),
        ("lm-eval", "delegate to lm-eval"),
    ):
        mode = sub.add_parser(name, help=help_text)
        mode.add_argument("--model", required=True, help="checkpoint directory or hub id")
        add_engine_arguments(mode)
    sub.choices["boolq"].add_argument("--data", required=True, help="a .jsonl file or a folder")
    sub.choices["boolq"].add_argument("--json", help="also write the results here")
    lm_eval = sub.choices["lm-eval"]
    lm_eval.add_argument("--tasks", default="", help="e.g. gsm8k,ceval-valid,mmlu")
    lm_eval.add_argument("--boolq", help=f"a BoolQ .jsonl to evaluate as the task {BOOLQ_TASK}")
    lm_eval.add_argument("--url", help="a running vllm serve (http://HOST:PORT): local-completions")
    lm_eval.add_argument(
        "--lm-eval-python", default=sys.executable, help="the Python that has lm-eval installed"
    )
    args, extra = parser.parse_known_args(argv)
    if args.mode == "boolq" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.mode == "lm-eval" and not (args.tasks or args.boolq):
        parser.error("lm-eval needs --tasks, --boolq or both")
    if args.mode == "lm-eval" and args.boolq and not Path(args.boolq).is_file():
        parser.error(f"--boolq {args.boolq} is not a file")
    check_engine_arguments(parser, args)
    if args.mode == "boolq" and not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist")
    return args, extra


@command
def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.mode == "lm-eval":
        return run_lm_eval(args, extra)
    try:
        results = run_boolq(args)
    except ValueError as error:
        raise SystemExit(f"precision: {error}") from None
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
