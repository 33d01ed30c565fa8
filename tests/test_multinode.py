"""Two nodes of two ranks each (TP=4) on vLLM's own multi-node executor, each started by the user
script ``examples/multinode.sh``: node 0 serves the OpenAI API, node 1 runs headless, as two
hosts (``tests/two_hosts.py``: two network namespaces joined by a veth pair, loopback where they
cannot be made). fp32 greedy tokens and top-5 logprobs equal transformers'. Without
``patches/patch_cpu_multinode_queues.py`` node 0 dies at start."""

import pytest
from reference import prompt_token_ids, transformers_greedy
from two_hosts import SMALL_ENGINE, healthy, served_greedy, start_node, two_hosts

from vllm_ernie_moe.tools.served import free_port, stop, wait_until_healthy

MAX_TOKENS = 12
TOP_K = 5
FP32_LOGPROB_TOLERANCE = 1e-3
NODE_START_TIMEOUT = 600
SERVE_ARGS = ["--dtype", "float32", *SMALL_ENGINE]


@pytest.fixture(scope="module")
def two_nodes(checkpoint, tmp_path_factory):
    """(model, node 0's API URL, node 0's host) for two running nodes."""
    path = checkpoint("tiny-21b")
    logs = tmp_path_factory.mktemp("two-nodes")
    with two_hosts() as hosts:
        ports = (free_port(), free_port())
        started = [
            start_node(rank, hosts, path, ports, logs / f"node{rank}.log", SERVE_ARGS, tp=4)
            for rank in (0, 1)
        ]
        try:
            url = f"http://{hosts[0].address}:{ports[0]}"
            wait_until_healthy(started, lambda: healthy(hosts[0], url), logs, NODE_START_TIMEOUT)
            yield path, url, hosts[0]
        finally:
            for process in started:
                stop(process)


def test_tp4_over_two_nodes_matches_transformers(two_nodes):
    path, url, node0 = two_nodes
    reference = transformers_greedy(path, "float32", MAX_TOKENS, TOP_K)
    for i, (ids, ref) in enumerate(zip(prompt_token_ids(path), reference, strict=True)):
        got = served_greedy(node0, url, path, ids, MAX_TOKENS, TOP_K)
        assert got.token_ids == ref.token_ids, f"prompt {i}: greedy tokens differ"
        for step, (ref_step, got_step) in enumerate(zip(ref.logprobs, got.logprobs)):
            assert ref_step.keys() == got_step.keys(), f"prompt {i} step {step}: top-5 differ"
            worst = max(abs(ref_step[t] - got_step[t]) for t in ref_step)
            assert worst < FP32_LOGPROB_TOLERANCE, f"prompt {i} step {step}: logprob off by {worst}"
