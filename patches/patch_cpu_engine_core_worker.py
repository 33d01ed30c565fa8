"""Patch (default; ``VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE=0`` turns it off): on CPU, one worker
runs inside vLLM's engine-core process, which starts with the worker's OpenMP binding, instead of
in a process of its own; the engine core's socket threads stay unbound.

- Targets: ``vllm.platforms.cpu.CpuPlatform.check_and_update_config``,
  ``vllm.v1.engine.utils.CoreEngineProcManager.__init__`` and
  ``vllm.v1.engine.core.EngineCoreProc.process_input_sockets`` / ``process_output_sockets``
  (vLLM 0.27.1, 0.32.0; 0.33.0 has the same code).
- Why: vLLM's CPU platform turns the one-worker ``uni`` executor into ``mp`` while
  ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (the default), because OpenMP reads its binding
  (``OMP_NUM_THREADS`` with ``OMP_PLACES``/``OMP_PROC_BIND``, ``GOMP_CPU_AFFINITY`` or
  ``KMP_AFFINITY``) once, when a process loads it: the ``mp`` executor starts the worker with
  that environment (``vllm.utils.ompmultiprocessing``). With that setting the engine core is
  itself a fresh process vLLM starts (by spawn on CPU), so it can start with the same
  environment and run the worker. The worker's process costs a second import of torch, vLLM and
  the plugin at every start: 7-9 s of a warm 28-layer ``vllm serve`` start
  (docs/results/startup-lines-28layers-w4a16-serve-engine-core-worker-zen4.txt).
- The socket threads: OpenMP binds the process's first thread when it loads, and every thread
  started after that inherits its one core. The engine core starts its ZMQ input and output
  threads (and through them ZMQ's own) after the worker is built, so they would all share the
  first OpenMP thread's core; in vLLM's layout they run on every CPU of the caller. They take
  the caller's CPUs back as they start. Bound, the layout decoded 0.74-0.89x as fast at batch 1
  as vLLM's in three rounds; unbound, 0.71-1.14x (geometric mean 0.95; batch 8: 1.02) in eight
  interleaved rounds, where ``LLM(...)`` took 16.7-18.3 s against 22.9-24.1 s
  (docs/results/engine-core-socket-threads-28layers-zen4.txt).
- How: for this plugin's model, where the platform replaced ``uni`` by ``mp`` (one worker, one
  data-parallel rank, no backend asked for), ``uni`` is kept; the engine-core process starts
  inside vLLM's own ``OMPProcessManager.configure_omp_envs`` for rank 0, so it has the
  environment the worker process would have had (``VLLM_CPU_OMP_THREADS_BIND``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU`` honoured; ``nobind``: none). Other models, more workers and
  an explicit ``--distributed-executor-backend mp`` are unchanged. In a ``vllm serve`` started
  with the plugin's hook, that process is forked from the engine-core server where the
  environment allows (``vllm_ernie_moe/engine_core_server.py``); the server stops otherwise.
- Decided by the target's source: applies while ``check_and_update_config`` forces ``mp``.
- Upstream: no issue found. The upstream form: the platform keeps ``uni`` when the engine core
  is a process of its own and passes it the binding.
- Remove when: vLLM's CPU platform keeps one worker in the engine-core process.
- Test: ``tests/test_patch_cpu_engine_core_worker.py``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator
from unittest import mock

from vllm.config import VllmConfig
from vllm.platforms import current_platform

from vllm_ernie_moe import ARCHITECTURE, engine_core_server, envs
from vllm_ernie_moe.patches.patching import install

PLATFORM_MODULE = "vllm.platforms.cpu"
ENGINE_UTILS_MODULE = "vllm.v1.engine.utils"
ENGINE_CORE_MODULE = "vllm.v1.engine.core"
SOCKET_THREADS = ("process_input_sockets", "process_output_sockets")
# The platform's rule, as source and as ``ast.unparse`` writes it (tests/test_vllm_api.py).
_IS_UNI = r"distributed_executor_backend == [\"']uni[\"']"
_SET_MP = r"distributed_executor_backend = [\"']mp[\"']"


def runs_the_worker_in_the_engine_core(vllm_config: VllmConfig) -> bool:
    """Whether the one worker of this engine belongs in its engine-core process: this plugin's
    model, one worker, one data-parallel rank, ``VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE`` not 0."""
    parallel, model = vllm_config.parallel_config, vllm_config.model_config
    return (
        envs.worker_in_engine_core()
        and parallel.world_size == 1
        and parallel.data_parallel_size == 1
        and model is not None
        and ARCHITECTURE in (getattr(model.hf_config, "architectures", None) or [])
    )


def holds_its_worker(executor_class: type, vllm_config: VllmConfig) -> bool:
    """Whether an engine core with this executor runs its one worker itself (``uni``)."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return issubclass(executor_class, UniProcExecutor) and runs_the_worker_in_the_engine_core(
        vllm_config
    )


def keeps_one_worker_in_the_engine_core(check_and_update_config: Callable) -> Callable:
    """``check_and_update_config`` that undoes the platform's ``uni`` -> ``mp`` for one worker."""

    @functools.wraps(check_and_update_config)
    def patched(cls: type, vllm_config: VllmConfig) -> None:
        parallel = vllm_config.parallel_config
        asked = parallel.distributed_executor_backend
        check_and_update_config(cls, vllm_config)
        forced = asked == "uni" and parallel.distributed_executor_backend == "mp"
        if forced and runs_the_worker_in_the_engine_core(vllm_config):
            parallel.distributed_executor_backend = "uni"

    return patched


@contextlib.contextmanager
def _started_by_the_engine_core_server(vllm_config: VllmConfig, module: str) -> Iterator[None]:
    """In a ``vllm serve`` started with the plugin's hook, start the engine core through
    ``engine_core_server`` (forked from its server where the environment allows)."""
    context = engine_core_server.engine_core_context()
    if context is None or getattr(vllm_config.parallel_config, "numa_bind", False):
        engine_core_server.stop_server()
        yield
        return
    engine_utils = importlib.import_module(module)
    get_mp_context = engine_utils.get_mp_context

    def server_context() -> engine_core_server.EngineCoreContext:
        get_mp_context()  # vLLM's own checks (those that force spawn) still run
        return context

    with mock.patch.object(engine_utils, "get_mp_context", server_context):
        yield


def starts_the_engine_core_bound(init: Callable) -> Callable:
    """``CoreEngineProcManager.__init__`` that starts the engine core of a one-worker engine, which
    runs its worker, with the OpenMP environment vLLM's ``mp`` executor gives a worker process."""

    @functools.wraps(init)
    def patched(self, *args, **kwargs) -> None:
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        arguments = inspect.signature(init).bind(self, *args, **kwargs).arguments
        vllm_config = arguments["vllm_config"]
        if not (
            arguments["local_engine_count"] == 1
            and holds_its_worker(arguments["executor_class"], vllm_config)
        ):
            engine_core_server.stop_server()
            return init(self, *args, **kwargs)
        with (
            OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0),
            _started_by_the_engine_core_server(vllm_config, init.__module__),
        ):
            return init(self, *args, **kwargs)

    return patched


def runs_unbound(process_sockets: Callable) -> Callable:
    """An engine-core socket thread's body that first takes back the CPUs of the process that
    started the engine core, where the engine core holds its worker (and so its binding)."""

    @functools.wraps(process_sockets)
    def patched(self, *args, **kwargs) -> None:
        if holds_its_worker(type(self.model_executor), self.vllm_config):
            os.sched_setaffinity(0, os.sched_getaffinity(engine_core_server.caller_pid()))
        return process_sockets(self, *args, **kwargs)

    return patched


def forces_mp_for_one_worker_source(source: str) -> bool:
    """Whether ``check_and_update_config``'s source turns ``uni`` into ``mp`` (the probe)."""
    uni = re.search(_IS_UNI, source)
    return uni is not None and re.search(_SET_MP, source[uni.end() :]) is not None


def _forces_mp_for_one_worker(check_and_update_config: Callable) -> bool:
    return forces_mp_for_one_worker_source(inspect.getsource(check_and_update_config))


def apply() -> bool:
    """Keep one CPU worker in the engine-core process, bound; idempotent. True when active."""
    if not current_platform.is_cpu():
        engine_core_server.stop_server()
        return False
    platform = importlib.import_module(PLATFORM_MODULE).CpuPlatform
    if not install(
        __name__, platform, "check_and_update_config", keeps_one_worker_in_the_engine_core,
        bug_present=_forces_mp_for_one_worker,
        fixed="one worker stays in the engine-core process",
    ):  # fmt: skip
        return False
    engine_core = importlib.import_module(ENGINE_CORE_MODULE).EngineCoreProc
    for thread in SOCKET_THREADS:
        install(
            __name__, engine_core, thread, runs_unbound,
            fixed="the engine core's socket threads run on the caller's CPUs, not the worker's",
        )  # fmt: skip
    engine_utils = importlib.import_module(ENGINE_UTILS_MODULE)
    return install(
        __name__, engine_utils.CoreEngineProcManager, "__init__", starts_the_engine_core_bound,
        fixed="the engine-core process of a one-worker engine starts with the worker's binding",
    )  # fmt: skip
