"""Two nodes of two ranks each (TP=4) on vLLM's own multi-node executor, each started by the user
script ``examples/multinode.sh``: node 0 serves the OpenAI API, node 1 runs headless, as two
hosts: two network namespaces joined by a veth pair, each with its own address (the test talks
to node 0 from inside its namespace); on loopback where namespaces cannot be made (not root, no
iproute2). fp32 greedy tokens and top-5 logprobs equal transformers'. Without
``patches/patch_cpu_multinode_queues.py`` node 0 dies at start."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from reference import prompt_token_ids, transformers_greedy

from vllm_ernie_moe.tools.served import VLLM_CLI, free_port, stop, wait_until_healthy

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "multinode.sh"
MAX_TOKENS = 12
TOP_K = 5
FP32_LOGPROB_TOLERANCE = 1e-3
NODE_START_TIMEOUT = 600


@contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair, each with its own address: per node, its
    address and the command prefix that runs a command there."""
    names = [f"ernie{os.getpid()}n{i}" for i in (0, 1)]
    addresses = ["10.231.0.1", "10.231.0.2"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", f"{names[0]}v", "type", "veth", "peer", "name", f"{names[1]}v")
        for name, address in zip(names, addresses):
            ip("link", "set", f"{name}v", "netns", name)
            ip("-n", name, "addr", "add", f"{address}/30", "dev", f"{name}v")
            ip("-n", name, "link", "set", f"{name}v", "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield [(address, ["ip", "netns", "exec", name]) for name, address in zip(names, addresses)]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def loopback():
    yield [("127.0.0.1", []), ("127.0.0.1", [])]


#: An HTTP request made from inside a node's namespace: URL, JSON body or "", timeout.
CLIENT = """
import json, sys, requests
url, body, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    if body:
        reply = requests.post(url, json=json.loads(body), timeout=timeout)
    else:
        reply = requests.get(url, timeout=timeout)
    print(json.dumps({"status": reply.status_code, "json": reply.json() if body else None}))
except requests.ConnectionError:
    print(json.dumps({"status": None, "json": None}))
"""


def http(on_node: list[str], url: str, body: dict | None = None, timeout: float = 120) -> dict:
    """GET (or POST ``body``) from node 0's side: {"status": code or None, "json": reply}."""
    command = [*on_node, sys.executable, "-c", CLIENT, url, json.dumps(body) if body else "",
               str(timeout)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def start_node(rank: int, model: Path, addresses: list[str], ports: tuple[int, int], log: Path,
               on_node: list[str]) -> subprocess.Popen:  # fmt: skip
    environment = dict(
        os.environ, MASTER_ADDR=addresses[0], THIS_ADDR=addresses[rank], PORT=str(ports[0]),
        MASTER_PORT=str(ports[1]), TP="4", VLLM_CLI=str(VLLM_CLI),
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # 4 ranks on this host's cores
    )  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(
            [*on_node, str(SCRIPT), str(rank), str(model), "--dtype", "float32",
             "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"],
            stdout=out, stderr=subprocess.STDOUT, env=environment,
        )  # fmt: skip


def namespaces_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture(scope="module")
def two_nodes(checkpoint, tmp_path_factory):
    """(model, node 0's API URL, node 0's command prefix) for two running nodes."""
    path = checkpoint("tiny-21b")
    logs = tmp_path_factory.mktemp("two-nodes")
    hosts = two_hosts() if namespaces_possible() else loopback()
    with hosts as nodes:
        addresses = [address for address, _ in nodes]
        ports = (free_port(), free_port())
        started = [
            start_node(rank, path, addresses, ports, logs / f"node{rank}.log", on_node)
            for rank, (_, on_node) in enumerate(nodes)
        ]
        try:
            url = f"http://{addresses[0]}:{ports[0]}"
            wait_until_healthy(
                started[0], lambda: http(nodes[0][1], f"{url}/health", timeout=2)["status"] == 200,
                logs / "node0.log", NODE_START_TIMEOUT,
            )  # fmt: skip
            yield path, url, nodes[0][1]
        finally:
            for process in started:
                stop(process)


def completion(url: str, on_node: list[str], model: Path, prompt: list[int]):
    """Greedy token ids and, per step, the top-5 token id -> logprob."""
    body = {
        "model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "logprobs": TOP_K, "ignore_eos": True, "return_tokens_as_token_ids": True,
    }  # fmt: skip
    reply = http(on_node, f"{url}/v1/completions", body)
    assert reply["status"] == 200, reply
    logprobs = reply["json"]["choices"][0]["logprobs"]

    def token_id(text: str) -> int:
        return int(text.removeprefix("token_id:"))

    tokens = [token_id(t) for t in logprobs["tokens"]]
    steps = [{token_id(t): p for t, p in step.items()} for step in logprobs["top_logprobs"]]
    return tokens, steps


def test_tp4_over_two_nodes_matches_transformers(two_nodes):
    path, url, on_node0 = two_nodes
    reference = transformers_greedy(path, "float32", MAX_TOKENS, TOP_K)
    for i, (ids, ref) in enumerate(zip(prompt_token_ids(path), reference, strict=True)):
        tokens, steps = completion(url, on_node0, path, ids)
        assert tokens == ref.token_ids, f"prompt {i}: greedy tokens differ"
        for step, (ref_step, got_step) in enumerate(zip(ref.logprobs, steps)):
            assert ref_step.keys() == got_step.keys(), f"prompt {i} step {step}: top-5 differ"
            worst = max(abs(ref_step[t] - got_step[t]) for t in ref_step)
            assert worst < FP32_LOGPROB_TOLERANCE, f"prompt {i} step {step}: logprob off by {worst}"
