"""``vllm serve`` on CPU: the engine-core process forked from a server that imported it while the
API server imported its own modules, instead of a spawned interpreter that imports them after.

A warm ``vllm serve`` start of the 28-layer model spends 12 s importing the API server, then 9-10 s
importing the engine-core process vLLM spawns once the API server has its config
(docs/notes/startup-breakdown.md). Those imports run one after the other on a two-core box.

- **Started early.** The ``.pth`` file this package installs calls :func:`start_for_vllm_serve`
  when an interpreter starts as ``vllm serve``. It starts Python's fork server
  (``multiprocessing.forkserver``), which imports what the engine core imports
  (``engine_core_preload``) on the other core.
- **Only with the environment the engine core would get.** vLLM's API server changes its
  environment before it starts the engine core: its CPU platform preloads libgomp and tcmalloc
  (``LD_PRELOAD``), sets the OpenMP binding (``GOMP_CPU_AFFINITY``/``OMP_PLACES``) and inductor's
  variables. Libraries read those once, when they load. So each start remembers what vLLM changed
  (a note in ``VLLM_ERNIE_MOE_CACHE_DIR``), and the next start's server begins with the same
  changes. The engine core is forked from the server only when the environment it would be
  spawned with equals the server's, key for key; otherwise vLLM spawns it, as always, and the
  server stops. A first start, a changed setting or a changed vLLM therefore cost nothing but the
  server's idle imports.
- **Only before OpenMP starts.** A process forked after OpenMP started its threads hangs in its
  first parallel region. The server checks that it still has one thread after its imports and
  exits otherwise (then vLLM spawns).

Where it applies: one engine core holding its one worker
(``patches/patch_cpu_engine_core_worker.py``), no NUMA wrapper.
``VLLM_ERNIE_MOE_ENGINE_CORE_SERVER=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
from pathlib import Path
from unittest import mock

from vllm_ernie_moe import envs

#: What the server imports (its import does the work; see that module).
PRELOAD_MODULE = "vllm_ernie_moe.engine_core_preload"

#: The API server's environment as it started, when it started as ``vllm serve`` with the hook.
_start_environment: dict[str, str] | None = None
#: The environment the server was started with, until it stops or forks the engine core.
_server_environment: dict[str, str] | None = None
#: The server: a ``ForkServer`` of its own, not ``multiprocessing``'s shared one, which vLLM
#: (``VLLM_WORKER_MULTIPROC_METHOD=forkserver``) or Python's default start method may use.
_server = multiprocessing.forkserver.ForkServer()


def is_vllm_serve(argv: list[str]) -> bool:
    """Whether a process runs vLLM's ``serve`` command (``vllm serve ...``)."""
    return len(argv) > 1 and Path(argv[0]).name == "vllm" and argv[1] == "serve"


def note_path() -> Path:
    """Where a start leaves what vLLM changed in the environment, per Python installation."""
    installation = hashlib.sha256(sys.executable.encode()).hexdigest()[:16]
    return envs.cache_dir() / "engine-core-environment" / f"{installation}.json"


def _read_note() -> dict[str, str | None] | None:
    """The last start's note, if this user wrote it and nobody else can (it sets ``LD_PRELOAD``)."""
    try:
        status = note_path().stat()
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            return None
        note = json.loads(note_path().read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(note, dict) and all(
        isinstance(key, str) and isinstance(value, (str, type(None))) for key, value in note.items()
    )
    return note if valid else None


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str | None]:
    """What turned ``before`` into ``after``: new values, and ``None`` for removed keys."""
    changed: dict[str, str | None] = {k: v for k, v in after.items() if before.get(k) != v}
    changed.update({k: None for k in before if k not in after})
    return changed


def applied(environment: dict[str, str], note: dict[str, str | None]) -> dict[str, str]:
    """``environment`` with a note's changes made."""
    result = {k: v for k, v in environment.items() if note.get(k, v) is not None}
    result.update({k: v for k, v in note.items() if v is not None})
    return result


def start_for_vllm_serve() -> None:
    """The ``.pth`` hook: in a ``vllm serve`` process, remember the starting environment and, if
    the last start left a note, start the server with that environment. Never raises."""
    global _start_environment, _server_environment
    try:
        if not (sys.platform == "linux" and envs.engine_core_server() and is_vllm_serve(sys.argv)):
            return
        _start_environment = dict(os.environ)
        note = _read_note()
        if note is None:
            return
        server_environment = applied(_start_environment, note)
        # The resource tracker, which the server starts too, keeps the API server's environment.
        multiprocessing.resource_tracker.ensure_running()
        _server.set_forkserver_preload([PRELOAD_MODULE])
        os.environ.clear()
        os.environ.update(server_environment)
        try:
            _server.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(_start_environment)
        _server_environment = server_environment
    except Exception as error:  # a start hook must never stop the interpreter
        print(f"vllm-ernie-moe: engine-core server not started: {error!r}", file=sys.stderr)


# ``ForkServer`` has no public way to ask whether its server runs or to stop it at once.
def _server_alive() -> bool:
    pid = _server._forkserver_pid
    return pid is not None and os.waitpid(pid, os.WNOHANG)[0] == 0


def stop_server() -> None:
    """Stop the server where this start does not fork its engine core from it (it holds the
    imported modules' memory for as long as the API server runs). Never after a fork: a forked
    engine core's exit status reaches vLLM through the server."""
    global _server, _server_environment
    if _server_environment is None:
        return
    _server_environment = None
    pid = _server._forkserver_pid
    if pid is not None:  # importing still, waiting, or exited (then reaped by _server_alive)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(_server._forkserver_alive_fd)
    _server = multiprocessing.forkserver.ForkServer()  # its socket is abstract (Linux only)


def note_for(
    start: dict[str, str], engine_core: dict[str, str], previous: dict[str, str | None]
) -> dict[str, str | None]:
    """The note a start leaves: the engine core's values of what vLLM changed in ``start``, and of
    what earlier notes named. A start whose parent had imported vLLM (a test, a script) begins
    with vLLM's variables set and changes fewer; with the earlier keys kept, its note still
    serves a start from a shell, and the other way round."""
    keys = set(changes(start, engine_core)) | set(previous)
    return {key: engine_core.get(key) for key in sorted(keys)}


def _remember(environment: dict[str, str]) -> None:
    """Leave the next start a note of what vLLM changed in this start's environment."""
    assert _start_environment is not None
    path = note_path()
    note = note_for(_start_environment, environment, _read_note() or {})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w") as file:
            json.dump(note, file, indent=1)
        temporary.replace(path)
    except OSError as error:
        _logger().debug("engine-core environment note not written to %s: %s", path, error)


def _logger():
    from vllm.logger import init_logger

    return init_logger(f"vllm.{__name__}")


def server_mismatch(environment: dict[str, str]) -> str | None:
    """Why the engine core cannot be forked from the server now, or None when it can."""
    if _server_environment is None:
        return "no server was started"
    if not _server_alive():
        return "the server exited (it had started threads, or an import failed)"
    differing = sorted(changes(_server_environment, environment))
    if differing:
        return f"the engine core's environment differs from the server's in {differing}"
    return None


class EngineCoreProcess(multiprocessing.context.SpawnProcess):
    """vLLM's engine-core process: forked from the server when the environment it would be
    spawned with is the server's, spawned otherwise."""

    @staticmethod
    def _Popen(process_obj):
        global _server_environment
        environment = dict(os.environ)
        _remember(environment)
        reason = server_mismatch(environment)
        if reason is None:
            from multiprocessing.popen_forkserver import Popen

            try:
                with mock.patch.object(
                    multiprocessing.forkserver, "connect_to_new_process",
                    _server.connect_to_new_process,
                ):  # fmt: skip
                    forked = Popen(process_obj)
            except (OSError, EOFError) as error:  # it exited between the check and the fork
                reason = f"the server did not fork it ({error!r})"
            else:
                _server_environment = None  # one engine core per server; it stays for its status
                _logger().info("vllm-ernie-moe: engine core forked from the pre-imported server")
                return forked
        _logger().info("vllm-ernie-moe: engine core spawned: %s", reason)
        stop_server()
        from multiprocessing.popen_spawn_posix import Popen

        return Popen(process_obj)


class EngineCoreContext(multiprocessing.context.SpawnContext):
    """The multiprocessing context vLLM's ``CoreEngineProcManager`` starts the engine core with."""

    Process = EngineCoreProcess


def engine_core_context() -> EngineCoreContext | None:
    """The context to start this engine core with, in a ``vllm serve`` started with the hook."""
    return EngineCoreContext() if _start_environment is not None else None


def caller_pid() -> int:
    """The process that started this engine core: the API server, also when the server forked it."""
    preload = sys.modules.get(PRELOAD_MODULE)
    return getattr(preload, "CALLER_PID", None) or os.getppid()
