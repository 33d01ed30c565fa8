"""Patch: on CPU, one worker runs inside vLLM's engine-core process, which starts with the
worker's OpenMP binding, instead of in a process of its own.

- Targets: ``vllm.platforms.cpu.CpuPlatform.check_and_update_config`` and
  ``vllm.v1.engine.utils.CoreEngineProcManager.__init__`` (vLLM 0.27.1, 0.32.0; 0.33.0 has the
  same code).
- Why: vLLM's CPU platform turns the one-worker ``uni`` executor into ``mp`` while
  ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (the default), because OpenMP reads its binding
  (``OMP_NUM_THREADS``, ``OMP_PLACES``/``OMP_PROC_BIND`` or Intel's ``KMP_AFFINITY``) once, when
  a process loads it: the ``mp`` executor starts the worker with that environment
  (``vllm.utils.ompmultiprocessing``). Yet with that setting the engine core is itself a fresh
  process vLLM starts (by spawn on CPU), so it can be given the same environment, and it then
  runs the worker as well as ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` already makes it do under
  ``vllm serve``. The worker's process costs a second import of torch, vLLM and the plugin at
  every start: 6-7 s of a 47.6 s warm ``vllm serve`` start of the 28-layer 21B-A3B, against 26-27
  s in the engine core (docs/notes/startup-breakdown.md), and a shared-memory round trip a step.
- How: for this plugin's model, where the platform replaced ``uni`` by ``mp`` (one worker:
  tensor x pipeline parallel 1; the user did not ask for ``mp``), ``uni`` is kept; the
  engine-core process starts inside vLLM's own ``OMPProcessManager.configure_omp_envs`` for rank
  0, so it has the environment the worker process would have had (``VLLM_CPU_OMP_THREADS_BIND``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU`` honoured; ``nobind``: none). ``--distributed-executor-backend
  mp`` or ``VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE=0`` keeps vLLM's layout; more than one worker and
  other models are unchanged. The scheduler and the model's first OpenMP thread are then one
  thread: on CPU they ran one after the other anyway (no async scheduling). The engine core's
  other threads (its ZMQ input and output) are bound with that thread.
- Decided by the target's source: applies while ``check_and_update_config`` forces ``mp``.
- Upstream: no issue found. The upstream form: the platform keeps ``uni`` when the engine core
  is a process of its own and passes it the binding.
- Remove when: vLLM's CPU platform keeps one worker in the engine-core process.
- Test: ``tests/test_patch_cpu_engine_core_worker.py``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

from vllm.platforms import current_platform

from vllm_ernie_moe import ARCHITECTURE, envs
from vllm_ernie_moe.patches.patching import install

PLATFORM_MODULE = "vllm.platforms.cpu"
ENGINE_UTILS_MODULE = "vllm.v1.engine.utils"


def serves_this_plugins_model(vllm_config) -> bool:
    model = vllm_config.model_config
    return model is not None and ARCHITECTURE in (
        getattr(model.hf_config, "architectures", None) or []
    )


def keeps_one_worker_in_the_engine_core(check_and_update_config):
    """``check_and_update_config`` that undoes the platform's ``uni`` -> ``mp`` for one worker."""

    @functools.wraps(check_and_update_config)
    def patched(vllm_config) -> None:
        parallel = vllm_config.parallel_config
        asked = parallel.distributed_executor_backend
        check_and_update_config(vllm_config)
        forced = asked == "uni" and parallel.distributed_executor_backend == "mp"
        if forced and serves_this_plugins_model(vllm_config) and envs.worker_in_engine_core():
            parallel.distributed_executor_backend = "uni"

    return patched


def starts_the_engine_core_bound(init):
    """``CoreEngineProcManager.__init__`` that starts an engine core which runs its worker with the
    OpenMP environment vLLM's ``mp`` executor gives a worker process."""

    @functools.wraps(init)
    def patched(self, *args, **kwargs) -> None:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        arguments = inspect.signature(init).bind(self, *args, **kwargs).arguments
        vllm_config = arguments["vllm_config"]
        if not (
            issubclass(arguments["executor_class"], UniProcExecutor)
            and arguments["local_engine_count"] == 1
            and serves_this_plugins_model(vllm_config)
        ):
            return init(self, *args, **kwargs)
        binding = OMPProcessManager(vllm_config)
        with binding.configure_omp_envs(rank=0, local_rank=0):
            return init(self, *args, **kwargs)

    return patched


def _forces_mp_for_one_worker_source(source: str) -> bool:
    return re.search(r"distributed_executor_backend = [\"']mp[\"']", source) is not None


def _forces_mp_for_one_worker(check_and_update_config) -> bool:
    return _forces_mp_for_one_worker_source(inspect.getsource(check_and_update_config))


def apply() -> bool:
    """Keep one CPU worker in the engine-core process, bound; idempotent. True when active."""
    if not current_platform.is_cpu():
        return False
    platform = importlib.import_module(PLATFORM_MODULE).CpuPlatform
    if not install(
        __name__, platform, "check_and_update_config", keeps_one_worker_in_the_engine_core,
        bug_present=_forces_mp_for_one_worker,
        fixed="one worker stays in the engine-core process",
    ):  # fmt: skip
        return False
    engine_utils = importlib.import_module(ENGINE_UTILS_MODULE)
    return install(
        __name__, engine_utils.CoreEngineProcManager, "__init__", starts_the_engine_core_bound,
        fixed="the engine-core process of a one-worker engine starts with the worker's binding",
    )  # fmt: skip
