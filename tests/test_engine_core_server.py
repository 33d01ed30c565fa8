"""vllm_ernie_moe/engine_core_server.py: ``vllm serve`` forks its engine core from the server the
``.pth`` hook started, only where the engine core's environment is the one vLLM would spawn it
with; it then answers as transformers does, with vLLM's binding, and otherwise vLLM spawns it.

The reference for "the environment vLLM gives it" and "the binding" is the spawned engine core of
the first start (no note yet, so no server), read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest
from reference import check_logprobs_close, prompt_token_ids, served_greedy, transformers_greedy
from settings import default_process_layout

from vllm_ernie_moe import engine_core_server
from vllm_ernie_moe.envs import CACHE_DIR_VARIABLE, ENGINE_CORE_SERVER_VARIABLE
from vllm_ernie_moe.patches import patch_cpu_engine_core_worker
from vllm_ernie_moe.tools.served import answers_health, vllm_serve

MAX_TOKENS = 8
HOOK = Path(engine_core_server.__file__).parent.parent / "vllm_ernie_moe_engine_core_server.pth"
pytestmark = pytest.mark.skipif(
    not patch_cpu_engine_core_worker.apply(), reason="vLLM's CPU platform keeps one worker in place"
)


@contextlib.contextmanager
def environment(**variables: str | None):
    saved = {name: os.environ.get(name) for name in variables}
    try:
        for name, value in variables.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def process_report(process: psutil.Process) -> dict:
    """What a process started with and where its threads may run: (name, CPUs) per thread."""
    raw = Path(f"/proc/{process.pid}/environ").read_bytes().decode()
    threads = []
    for thread in process.threads():
        task = Path(f"/proc/{process.pid}/task/{thread.id}")
        with contextlib.suppress(OSError):  # ended meanwhile
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
            cpus = status["Cpus_allowed_list"].strip()
            threads.append(((task / "comm").read_text().strip(), cpus))
    return dict(
        environ=dict(e.split("=", 1) for e in raw.split("\0") if "=" in e),
        parent_cmdline=" ".join(process.parent().cmdline()),
        threads=sorted(set(threads)),
    )


def serve_once(path: Path, log: Path, prompts: list[list[int]]) -> dict:
    """One ``vllm serve`` start as users run it: its greedy answers, its engine core, its log."""
    with default_process_layout(), vllm_serve(path, "--max-model-len", "256", "--enforce-eager",
                                              log=log) as served:  # fmt: skip
        client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0)
        answers = served_greedy(client, str(path), prompts, MAX_TOKENS)
        children = psutil.Process(served.pid).children(recursive=True)
        (engine_core,) = [c for c in children if "EngineCore" in " ".join(c.cmdline())]
        report = process_report(engine_core)
        report["servers"] = [c.pid for c in children if "forkserver" in " ".join(c.cmdline())]
        engine_core.kill()  # vLLM watches its engine core's sentinel: a forked one's too?
        report["unhealthy_after_kill"] = becomes_unhealthy(served.base_url, seconds=60)
    return dict(report, answers=answers, log=log.read_text())


def becomes_unhealthy(base_url: str, seconds: float) -> bool:
    """Whether the server stops answering /health with 200 within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not answers_health(base_url):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def starts(checkpoint, tmp_path_factory):
    """Three starts with an empty note directory: the first (no note), the second (the note),
    one with a binding setting changed. Turned off, it is tested without a start (below): a start
    costs half a minute of CI on a two-core host."""
    path = checkpoint("tiny-21b", "bfloat16")
    prompts = prompt_token_ids(path)
    logs = tmp_path_factory.mktemp("serve")
    notes = str(tmp_path_factory.mktemp("notes"))
    runs = {}
    settings = {
        "first": {},
        "second": {},
        "changed": {"VLLM_CPU_OMP_THREADS_BIND": "0"},
    }
    for name, changed in settings.items():
        fresh = {CACHE_DIR_VARIABLE: notes, ENGINE_CORE_SERVER_VARIABLE: None}
        with environment(**{**fresh, **changed}):
            runs[name] = serve_once(path, logs / f"{name}.log", prompts)
    return path, runs


def test_the_hook_is_installed_beside_the_packages():
    installed = [Path(d) / HOOK.name for d in site.getsitepackages()]
    assert any(p.is_file() and p.read_text() == HOOK.read_text() for p in installed), installed


def test_the_first_start_spawns_and_the_second_forks_from_the_server(starts):
    _, runs = starts
    assert "engine core spawned: no server was started" in runs["first"]["log"]
    assert "forkserver" not in runs["first"]["parent_cmdline"]
    assert "engine core forked from the pre-imported server" in runs["second"]["log"]
    assert "forkserver" in runs["second"]["parent_cmdline"]


def test_the_forked_engine_core_starts_with_the_spawned_ones_environment(starts):
    _, runs = starts
    spawned, forked = runs["first"]["environ"], runs["second"]["environ"]
    assert spawned.get("LD_PRELOAD") or spawned.get("OMP_NUM_THREADS"), "vLLM set nothing?"
    assert forked == spawned


def test_its_threads_run_where_the_spawned_ones_do(starts):
    _, runs = starts
    # OpenMP's threads take the binding; the ZMQ threads take the API server's CPUs.
    assert runs["second"]["threads"] == runs["first"]["threads"]


def test_every_start_answers_as_transformers_does(starts):
    path, runs = starts
    reference = transformers_greedy(path, "bfloat16", MAX_TOKENS, 5)
    for run in runs.values():
        check_logprobs_close(reference, run["answers"])


def test_the_api_server_notices_when_the_engine_core_dies(starts):
    """vLLM learns of its engine core's death through the process's sentinel; a forked engine
    core's comes from the server."""
    _, runs = starts
    assert {name: run["unhealthy_after_kill"] for name, run in runs.items()} == dict.fromkeys(
        runs, True
    )


def test_a_changed_setting_spawns_and_stops_the_server(starts):
    _, runs = starts
    changed = runs["changed"]
    assert "engine core spawned: the engine core's environment differs" in changed["log"]
    assert "GOMP_CPU_AFFINITY" in changed["log"] or "OMP_PLACES" in changed["log"]
    assert "forkserver" not in changed["parent_cmdline"]
    assert changed["servers"] == []


@pytest.fixture
def noted_vllm_serve(tmp_path, monkeypatch) -> Path:
    """This process as a ``vllm serve`` whose last start left a note (the hook's state restored
    after the test): the note's path."""
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vllm", "serve", "model"])
    for name in ("_start_environment", "_server_environment", "_server"):
        monkeypatch.setattr(engine_core_server, name, getattr(engine_core_server, name))
    note = engine_core_server.note_path()
    note.parent.mkdir(parents=True)
    note.write_text(json.dumps({"A_VARIABLE_VLLM_SETS": "1"}))
    note.chmod(0o600)
    return note


def test_turned_off_it_starts_no_server_and_leaves_the_engine_core_to_vllm(
    noted_vllm_serve, monkeypatch
):
    """With a note that would start the server, in a ``vllm serve`` process: nothing starts, and
    vLLM spawns the engine core with its own context."""
    note = noted_vllm_serve
    monkeypatch.setenv(ENGINE_CORE_SERVER_VARIABLE, "0")
    engine_core_server.start_for_vllm_serve()
    assert engine_core_server._server._forkserver_pid is None
    assert engine_core_server.engine_core_context() is None
    # On, the same call takes the start over (without the note: no server process here).
    note.unlink()
    monkeypatch.setenv(ENGINE_CORE_SERVER_VARIABLE, "1")
    engine_core_server.start_for_vllm_serve()
    assert engine_core_server.engine_core_context() is not None


def test_the_server_refuses_to_stay_after_openmp_started():
    """A child forked after OpenMP started its threads hangs in its first parallel region
    (docs/results/serve-engine-core-fork-zen4.txt): the server exits instead."""
    started_openmp = "import torch; torch.randn(256, 256) @ torch.randn(256, 256); "
    done = subprocess.run(
        [sys.executable, "-c", started_openmp + f"import {engine_core_server.PRELOAD_MODULE}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert "started threads; exiting" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/venv/bin/vllm", "serve", "model"], True),
        (["vllm", "serve"], True),
        (["/venv/bin/vllm", "bench", "serve"], False),
        (["/venv/bin/python", "-m", "vllm", "serve"], False),
        (["-c"], False),
    ],
)
def test_only_vllm_serve_is_a_vllm_serve(argv, expected):
    assert engine_core_server.is_vllm_serve(argv) is expected


def test_a_note_changes_exactly_what_vllm_changed():
    before = {"HOME": "/root", "OMP_NUM_THREADS": "8", "GONE": "1"}
    after = {"HOME": "/root", "OMP_NUM_THREADS": "2", "LD_PRELOAD": "libgomp.so.1"}
    note = engine_core_server.changes(before, after)
    assert note == {"OMP_NUM_THREADS": "2", "LD_PRELOAD": "libgomp.so.1", "GONE": None}
    assert engine_core_server.applied(before, note) == after


def test_a_note_serves_starts_from_other_parents():
    """A start from a shell, then one from a process that imported vLLM (its LD_PRELOAD already
    set), then one from a shell again: each note still gives the next start's engine core."""
    from_shell = {"HOME": "/root"}
    from_vllm = {"HOME": "/root", "LD_PRELOAD": "libgomp.so.1"}
    engine_core = {"HOME": "/root", "LD_PRELOAD": "libgomp.so.1", "OMP_NUM_THREADS": "2"}
    note = engine_core_server.note_for(from_shell, engine_core, {})
    assert engine_core_server.applied(from_vllm, note) == engine_core
    note = engine_core_server.note_for(from_vllm, engine_core, note)
    assert "LD_PRELOAD" in note  # vLLM did not change it this time; the earlier note named it
    assert engine_core_server.applied(from_shell, note) == engine_core


def test_a_broken_note_or_one_others_can_write_starts_no_server(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    note = engine_core_server.note_path()
    note.parent.mkdir(parents=True)
    for broken in ("{", json.dumps({"LD_PRELOAD": 3}), json.dumps(["a"])):
        note.write_text(broken)
        assert engine_core_server._read_note() is None
    note.write_text(json.dumps({"LD_PRELOAD": "/tmp/lib.so"}))
    note.chmod(0o600)
    assert engine_core_server._read_note() == {"LD_PRELOAD": "/tmp/lib.so"}
    note.chmod(0o622)  # the note chooses the server's LD_PRELOAD
    assert engine_core_server._read_note() is None


def test_a_server_that_exited_leaves_the_engine_core_spawned(noted_vllm_serve, monkeypatch):
    """The preload exits when it finds threads, or fails: vLLM spawns, and the start goes on."""
    engine_core_server.start_for_vllm_serve()
    pid = engine_core_server._server._forkserver_pid
    assert pid is not None, "the hook started no server"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monkeypatch.setenv("A_VARIABLE_VLLM_SETS", "1")  # the environment the server was started with
    process = engine_core_server.engine_core_context().Process(target=os.getpid)
    process.start()
    process.join(120)
    assert process.exitcode == 0
    assert engine_core_server._server_environment is None  # stopped, not to be forked from
