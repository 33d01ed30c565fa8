"""Node faults of a two-node engine (TP=4 as 2 + 2, ``examples/multinode.sh`` on two network
namespaces joined by a veth pair; loopback where they cannot be made), and what node 0 does.

    python benchmarks/multinode_faults.py [--faults NAME ...] [--json FILE]

Each fault runs with ``VLLM_ERNIE_MOE_NODE_TIMEOUT=60`` (the plugin's bound on waits between nodes;
900 s by default). Per fault: whether node 0 ended or answered with an error within its bound, the
seconds it took, and the log lines that say why. After the faults the same pair is started again
and must answer: a failed start leaves nothing behind that stops the next one. Exit code 1 when a
fault is not ended within its bound or the restarted pair does not serve.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_engines import machine  # noqa: E402
from two_hosts import SMALL_ENGINE, Host, healthy, http, start_node, two_hosts  # noqa: E402

from vllm_ernie_moe.tools.random_checkpoint import build_checkpoint  # noqa: E402
from vllm_ernie_moe.tools.served import free_port, stop, wait_until_healthy  # noqa: E402

NODE_TIMEOUT = 60
#: How long after the fault node 0 may take to end or report (the bound plus start-up slack).
BOUND = 240
SERVE_ARGS = ["--dtype", "float32", *SMALL_ENGINE]
#: Lines of a node's log that say why it stopped.
WHY = re.compile(
    r"vllm-ernie-moe: the nodes|differing|node \d+ \(|Timed out|clients joined|DistStoreError|"
    r"DistNetworkError|Connection (reset|closed|refused)|timed out|died|EngineDeadError|"
    r"Engine core initialization failed|Error|Node 0 of"
)  # fmt: skip


@dataclass
class Outcome:
    fault: str
    node0_exit_code: int | None = None
    seconds_to_end: float | None = None  # from the fault to node 0's exit or error reply
    within_bound: bool = False
    replies: list = field(default_factory=list)  # in-flight requests' HTTP statuses
    node0_says: list[str] = field(default_factory=list)
    node1_says: list[str] = field(default_factory=list)


def why(log: Path, limit: int = 8) -> list[str]:
    lines = [line.strip()[:400] for line in log.read_text(errors="replace").splitlines()]
    picked = [line for line in lines if WHY.search(line) and "ulimit" not in line]
    return list(dict.fromkeys(picked))[-limit:]


def kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node's process and every process under it, as a crash or power loss does."""
    root = psutil.Process(process.pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_exit(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


class Pair:
    """Start nodes of one engine on two hosts with per-node model and arguments."""

    def __init__(self, hosts: list[Host], logs: Path, name: str) -> None:
        self.hosts, self.logs, self.name = hosts, logs, name
        self.ports = (free_port(), free_port())
        self.url = f"http://{hosts[0].address}:{self.ports[0]}"
        self.nodes: list[subprocess.Popen] = []

    def log(self, rank: int) -> Path:
        return self.logs / f"{self.name}-node{rank}.log"

    def start(self, rank: int, model: Path, args: list[str] = SERVE_ARGS, tp: int = 4,
              master: str | None = None) -> subprocess.Popen:  # fmt: skip
        hosts = list(self.hosts)
        if master is not None:  # point this node at another node 0 address
            hosts[0] = Host(master, hosts[0].run_here)
        process = start_node(rank, hosts, model, self.ports, self.log(rank), args, tp,
                             VLLM_ERNIE_MOE_NODE_TIMEOUT=str(NODE_TIMEOUT))  # fmt: skip
        self.nodes.append(process)
        return process

    def wait_healthy(self, seconds: float = 600) -> bool:
        try:
            wait_until_healthy(self.nodes, lambda: healthy(self.hosts[0], self.url), self.logs,
                               seconds)  # fmt: skip
        except RuntimeError:
            return False
        return True

    def stop(self) -> None:
        for process in self.nodes:
            stop(process)


def start_failure(pair: Pair, outcome: Outcome, began: float) -> Outcome:
    """A fault at start: node 0 must exit within the bound."""
    code = wait_exit(pair.nodes[0], BOUND)
    outcome.node0_exit_code = code
    outcome.seconds_to_end = round(time.monotonic() - began, 1) if code is not None else None
    outcome.within_bound = code is not None and code != 0
    return outcome


def fault_never_started(pair: Pair, model: Path, other: Path) -> Outcome:
    began = time.monotonic()
    pair.start(0, model)
    return start_failure(pair, Outcome("node 1 never started"), began)


def fault_wrong_master(pair: Pair, model: Path, other: Path) -> Outcome:
    """Node 1 is given its own address as node 0's: nothing listens there."""
    began = time.monotonic()
    pair.start(0, model)
    pair.start(1, model, master=pair.hosts[1].address)
    outcome = start_failure(pair, Outcome("node 1 given a wrong master address"), began)
    wait_exit(pair.nodes[1], BOUND)
    return outcome


def fault_other_dtype(pair: Pair, model: Path, other: Path) -> Outcome:
    began = time.monotonic()
    pair.start(0, model)
    pair.start(1, model, [a if a != "float32" else "bfloat16" for a in SERVE_ARGS])
    return start_failure(
        pair, Outcome("node 1 started with --dtype bfloat16 (node 0 float32)"), began
    )


def fault_other_model(pair: Pair, model: Path, other: Path) -> Outcome:
    began = time.monotonic()
    pair.start(0, model)
    pair.start(1, other)
    return start_failure(
        pair, Outcome("node 1 started with another checkpoint of the same geometry"), began
    )


def fault_other_tp(pair: Pair, model: Path, other: Path) -> Outcome:
    began = time.monotonic()
    pair.start(0, model)
    pair.start(1, model, tp=2)
    return start_failure(pair, Outcome("node 1 started with TP 2 (node 0 TP 4)"), began)


def fault_killed_in_flight(pair: Pair, model: Path, other: Path) -> Outcome:
    """Four long requests in flight, then node 1 and all its ranks are SIGKILLed."""
    outcome = Outcome("node 1 killed with 4 requests in flight")
    pair.start(0, model)
    pair.start(1, model)
    if not pair.wait_healthy():
        outcome.node0_says = ["the pair never became healthy"]
        return outcome
    body = {"model": str(model), "prompt": "hello", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    replies: list = []

    def request() -> None:
        replies.append(http(pair.hosts[0], f"{pair.url}/v1/completions", body, timeout=BOUND))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    began = time.monotonic()
    kill_node(pair.nodes[1])
    for thread in threads:
        thread.join(BOUND + 40)
    answered = time.monotonic() - began
    code = wait_exit(pair.nodes[0], max(1.0, BOUND - answered))
    outcome.node0_exit_code = code
    outcome.seconds_to_end = round(time.monotonic() - began, 1)
    outcome.replies = [r.get("status") for r in replies]
    outcome.within_bound = (
        len(replies) == 4 and all(s != 200 for s in outcome.replies) and code is not None
    )
    return outcome


FAULTS = {
    "never-started": fault_never_started,
    "wrong-master": fault_wrong_master,
    "other-dtype": fault_other_dtype,
    "other-model": fault_other_model,
    "other-tp": fault_other_tp,
    "killed-in-flight": fault_killed_in_flight,
}


def restarted_pair_serves(hosts: list[Host], logs: Path, model: Path) -> bool:
    pair = Pair(hosts, logs, "restart")
    try:
        pair.start(0, model)
        pair.start(1, model)
        if not pair.wait_healthy():
            return False
        body = {"model": str(model), "prompt": "hello", "max_tokens": 4, "temperature": 0}
        return http(hosts[0], f"{pair.url}/v1/completions", body)["status"] == 200
    finally:
        pair.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="multinode-faults-"))
    logs = scratch / "logs"
    logs.mkdir()
    model = build_checkpoint(scratch / "model", "tiny-21b")
    other = build_checkpoint(scratch / "other", "tiny-21b", seed=1)
    outcomes = []
    with two_hosts() as hosts:
        for name in args.faults:
            pair = Pair(hosts, logs, name)
            try:
                outcome = FAULTS[name](pair, model, other)
            finally:
                pair.stop()
            outcome.node0_says = outcome.node0_says or why(pair.log(0))
            if pair.log(1).exists():
                outcome.node1_says = why(pair.log(1))
            outcomes.append(outcome)
            print(json.dumps(asdict(outcome), indent=1), flush=True)
        restarted = restarted_pair_serves(hosts, logs, model)
    print(f"restarted pair serves: {restarted}")
    if args.json:
        report = {"machine": machine(None), "node_timeout_s": NODE_TIMEOUT, "bound_s": BOUND,
                  "faults": [asdict(o) for o in outcomes], "restarted_pair_serves": restarted,
                  "logs": str(logs)}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if restarted and all(o.within_bound for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
