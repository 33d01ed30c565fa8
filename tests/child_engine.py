"""An engine made in a fresh interpreter, and what it saw: the processes it started (with the
OpenMP binding each started with, and the CPUs each of their threads may run on), the torch threads
of its caller, its greedy answers.

A fresh interpreter because an engine made earlier in the test process may already have pinned
the threads or started processes.
"""

from __future__ import annotations

import os
from pathlib import Path

from child_process import tagged_json
from reference import Generation

#: Variables that carry an OpenMP binding (vLLM's ``OMPProcessManager`` sets one of these sets).
BINDING_PREFIXES = ("OMP_", "GOMP_", "KMP_")

CHILD = """
import json, os, sys
import psutil, torch
from reference import prompt_token_ids, vllm_generations
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def started_with(pid):
    entries = open(f"/proc/{pid}/environ", "rb").read().decode().split("\\0")
    return dict(e.split("=", 1) for e in entries if e.startswith(tuple(sys.argv[4].split(","))))


def threads(pid):  # (name, CPUs it may run on) of each thread still running
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = f"/proc/{pid}/task/{tid}"
        try:
            status = dict(line.split(":", 1) for line in open(f"{task}/status"))
            name = open(f"{task}/comm").read().strip()
        except OSError:  # ended meanwhile
            continue
        found.append((name, status["Cpus_allowed_list"].strip()))
    return found


if __name__ == "__main__":
    path, max_tokens, top_k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads_before = torch.get_num_threads()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=512, max_num_seqs=8, enforce_eager=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(path)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=top_k, ignore_eos=True)
    answers = vllm_generations(llm.generate(prompts, params, use_tqdm=False))
    children = []
    for process in psutil.Process().children(recursive=True):
        try:
            children.append(dict(pid=process.pid, parent=process.ppid(),
                                 cmdline=" ".join(process.cmdline()),
                                 binding=started_with(process.pid),
                                 threads=threads(process.pid)))
        except (psutil.Error, OSError):  # gone already
            pass
    report = dict(
        children=children,
        threads_before=threads_before,
        threads_after=torch.get_num_threads(),
        answers=[(a.token_ids, [list(step.items()) for step in a.logprobs]) for a in answers],
    )
    print("REPORT " + json.dumps(report), flush=True)
"""


def engine_report(path: Path, env: dict[str, str], max_tokens: int, top_k: int) -> dict:
    """Make an engine on ``path`` in a fresh interpreter with ``env`` added; its report."""
    tests = os.pathsep.join(
        filter(None, (str(Path(__file__).parent), os.environ.get("PYTHONPATH")))
    )
    return tagged_json(
        ["-c", CHILD, str(path), str(max_tokens), str(top_k), ",".join(BINDING_PREFIXES)],
        "REPORT",
        timeout=600,
        env=dict(os.environ, **env, PYTHONPATH=tests),
    )


def answers(report: dict) -> list[Generation]:
    """The report's greedy answers as :class:`reference.Generation`."""
    return [
        Generation(tokens, [dict(step) for step in steps]) for tokens, steps in report["answers"]
    ]


def vllm_processes(report: dict) -> list[dict]:
    """The processes the engine started, without Python's multiprocessing resource tracker."""
    return [c for c in report["children"] if "resource_tracker" not in c["cmdline"]]
