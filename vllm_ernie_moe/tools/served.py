"""``vllm serve`` as a child process on loopback, for the tests, the load and soak benchmarks and
the lm-eval run: the real CLI and HTTP server, started the way a user starts it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from vllm_ernie_moe import envs

VLLM_CLI = Path(sys.executable).with_name("vllm")


@dataclass(frozen=True)
class Server:
    model: str
    base_url: str  # http://127.0.0.1:PORT
    pid: int
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_serve(
    model: str | os.PathLike, *args: str, log: Path, start_timeout: float = 300
) -> Iterator[Server]:
    """Start ``vllm serve MODEL ARGS`` on a free loopback port, wait for /health, stop it after.
    Its output goes to ``log``; a server that exits or never gets healthy raises, naming the log.
    On CPU it computes on every core with a small KV cache unless the environment says otherwise."""
    envs.use_all_cpu_cores()
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(VLLM_CLI), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy([process], lambda: answers_health(base), log, start_timeout)
        yield Server(str(model), base, process.pid, log)
    finally:
        stop(process)


def answers_health(base_url: str) -> bool:
    """Whether the server at ``base_url`` answers ``/health`` with 200 (not listening: no)."""
    try:
        return requests.get(f"{base_url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def wait_until_healthy(
    processes: Sequence[subprocess.Popen],
    healthy: Callable[[], bool],
    log: Path,
    start_timeout: float,
) -> None:
    """Poll ``healthy()`` until it is true; raise, naming ``log``, when one of the server's
    ``processes`` (its nodes, for a multi-node engine) exits or the timeout passes first."""
    deadline = time.monotonic() + start_timeout
    while not healthy():
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"vllm serve not healthy after {start_timeout:.0f} s; see {log}")
        time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a minute."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
