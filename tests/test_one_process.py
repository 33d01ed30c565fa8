"""The one-process layout the start-up notes measure for one CPU box
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, docs/benchmarks.md), which the tests also use
(settings.ONE_PROCESS): in a fresh process, the engine starts no process, computes on the threads
the process had (vLLM 0.32 reduces an engine's torch threads to one for serving; a worker in the
same process has pinned them first), and answers as transformers does.
"""

import pytest
from child_engine import answers, engine_report
from reference import check_logprobs_close, transformers_greedy
from settings import ONE_PROCESS

MAX_TOKENS, TOP_K = 16, 5


@pytest.fixture(scope="module")
def report(checkpoint):
    """What a fresh process with a tiny-21b engine made in it saw (child_engine.CHILD)."""
    path = checkpoint("tiny-21b", "bfloat16")
    return path, engine_report(path, {ONE_PROCESS: "0"}, MAX_TOKENS, TOP_K)


def test_the_engine_starts_no_process(report):
    _, seen = report
    assert seen["children"] == []


def test_the_engine_computes_on_the_threads_its_process_had(report):
    _, seen = report
    assert seen["threads_after"] == seen["threads_before"]


def test_it_answers_as_transformers_does(report):
    path, seen = report
    check_logprobs_close(transformers_greedy(path, "bfloat16", MAX_TOKENS, TOP_K), answers(seen))
