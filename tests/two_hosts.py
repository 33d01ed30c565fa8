"""Two hosts on one machine, for multi-node runs of ``examples/multinode.sh``: two network
namespaces joined by a veth pair, each with its own address (loopback where namespaces cannot be
made: not root, or no iproute2). Used by ``tests/test_multinode.py`` and
``benchmarks/world_sizes.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reference import Generation

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "multinode.sh"
ADDRESSES = ("10.231.0.1", "10.231.0.2")
#: ``vllm serve`` arguments for a tiny model: a short context and a small KV cache on every rank
#: (without ``--kv-cache-memory-bytes`` each rank of a node asks for 92 % of the machine's memory).
SMALL_ENGINE = ["--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager",
                "--kv-cache-memory-bytes", str(32 << 20)]  # fmt: skip


@dataclass(frozen=True)
class Host:
    address: str
    run_here: list[str]  # the command prefix that runs a command on this host


def namespaces_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextmanager
def two_hosts() -> Iterator[list[Host]]:
    """Two network namespaces joined by a veth pair, or loopback twice."""
    if not namespaces_possible():
        yield [Host("127.0.0.1", []), Host("127.0.0.1", [])]
        return
    names = [f"ernie{os.getpid()}n{i}" for i in (0, 1)]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", f"{names[0]}v", "type", "veth", "peer", "name", f"{names[1]}v")
        for name, address in zip(names, ADDRESSES):
            ip("link", "set", f"{name}v", "netns", name)
            ip("-n", name, "addr", "add", f"{address}/30", "dev", f"{name}v")
            ip("-n", name, "link", "set", f"{name}v", "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield [
            Host(address, ["ip", "netns", "exec", name]) for name, address in zip(names, ADDRESSES)
        ]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


#: An HTTP request made on a host: URL, JSON body or "", timeout.
CLIENT = """
import json, sys, requests
url, body, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    if body:
        reply = requests.post(url, json=json.loads(body), timeout=timeout)
    else:
        reply = requests.get(url, timeout=timeout)
    print(json.dumps({"status": reply.status_code, "json": reply.json() if body else None}))
except (requests.ConnectionError, requests.Timeout) as error:
    print(json.dumps({"status": None, "json": None, "error": type(error).__name__}))
"""


def http(host: Host, url: str, body: dict | None = None, timeout: float = 120) -> dict:
    """GET (or POST ``body``) from ``host``: {"status": code or None, "json": reply}."""
    command = [*host.run_here, sys.executable, "-c", CLIENT, url, json.dumps(body) if body else "",
               str(timeout)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def start_node(
    rank: int,
    hosts: list[Host],
    model: Path,
    ports: tuple[int, int],
    log: Path,
    serve_args: list[str],
    tp: int,
    **environment: str,
) -> subprocess.Popen:
    """``examples/multinode.sh RANK MODEL SERVE_ARGS`` on ``hosts[rank]``, node 0 at hosts[0];
    ports: (API port, rendezvous port). All ranks of a node share this host's cores (``nobind``)."""
    from vllm_ernie_moe.tools.served import VLLM_CLI

    settings = dict(
        os.environ, MASTER_ADDR=hosts[0].address, THIS_ADDR=hosts[rank].address,
        PORT=str(ports[0]), MASTER_PORT=str(ports[1]), TP=str(tp), VLLM_CLI=str(VLLM_CLI),
        VLLM_CPU_OMP_THREADS_BIND="nobind", **environment,
    )  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(
            [*hosts[rank].run_here, str(SCRIPT), str(rank), str(model), *serve_args],
            stdout=out, stderr=subprocess.STDOUT, env=settings,
        )  # fmt: skip


def healthy(host: Host, url: str) -> bool:
    return http(host, f"{url}/health", timeout=2)["status"] == 200


def served_greedy(
    host: Host, url: str, model: Path, prompt: list[int], max_tokens: int, top_k: int
) -> Generation:
    """A greedy completion from ``host`` with the top-k logprobs per step, by token id."""
    body = {
        "model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": top_k, "ignore_eos": True, "return_tokens_as_token_ids": True,
    }  # fmt: skip
    reply = http(host, f"{url}/v1/completions", body)
    assert reply["status"] == 200, reply
    return Generation.from_completion(reply["json"]["choices"][0]["logprobs"])
