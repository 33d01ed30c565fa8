"""The one-process layout the start-up notes measure for one CPU box
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, docs/benchmarks.md), which the tests also use
(settings.ONE_PROCESS): in a fresh process, the engine starts no process, computes on the threads
the process had (vLLM 0.32 reduces an engine's torch threads to one for serving; a worker in the
same process has pinned them first), and answers as transformers does.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reference import Generation, check_logprobs_close, transformers_greedy
from settings import ONE_PROCESS

MAX_TOKENS, TOP_K = 16, 5
# Run in a fresh interpreter: in this one an earlier engine may already have pinned the threads.
CHILD = """
import json, sys
import psutil, torch
from reference import prompt_token_ids, vllm_generations
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

path, max_tokens, top_k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
threads_before = torch.get_num_threads()
llm = LLM(model=path, dtype="bfloat16", max_model_len=512, max_num_seqs=8, enforce_eager=True)
prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(path)]
params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=top_k, ignore_eos=True)
answers = vllm_generations(llm.generate(prompts, params, use_tqdm=False))
report = dict(
    children=[child.pid for child in psutil.Process().children(recursive=True)],
    threads_before=threads_before,
    threads_after=torch.get_num_threads(),
    answers=[(a.token_ids, [list(step.items()) for step in a.logprobs]) for a in answers],
)
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture(scope="module")
def report(checkpoint):
    """What a fresh process with a tiny-21b engine made in it saw (CHILD)."""
    path = checkpoint("tiny-21b", "bfloat16")
    tests = os.pathsep.join(
        filter(None, (str(Path(__file__).parent), os.environ.get("PYTHONPATH")))
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(MAX_TOKENS), str(TOP_K)],
        env=dict(os.environ, **{ONE_PROCESS: "0"}, PYTHONPATH=tests),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-4000:]
    return path, json.loads(line.removeprefix("REPORT "))


def test_the_engine_starts_no_process(report):
    _, seen = report
    assert seen["children"] == []


def test_the_engine_computes_on_the_threads_its_process_had(report):
    _, seen = report
    assert seen["threads_after"] == seen["threads_before"]


def test_it_answers_as_transformers_does(report):
    path, seen = report
    answers = [
        Generation(tokens, [dict(step) for step in steps]) for tokens, steps in seen["answers"]
    ]
    check_logprobs_close(transformers_greedy(path, "bfloat16", MAX_TOKENS, TOP_K), answers)
