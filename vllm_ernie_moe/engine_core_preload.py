"""Imported only by the engine-core server (``engine_core_server.py``), before it forks the engine
core: what vLLM's engine-core process imports, then a check that no thread has started.

The plugin's patches are imported, not applied: the engine core loads the plugins itself, as a
spawned one does, so the patches are applied before the model's modules are imported.
"""

import os
import sys

#: The API server, which started the server: the engine core's caller.
CALLER_PID = os.getppid()

import vllm.entrypoints.cli.main  # noqa: E402, F401  (the engine core runs the ``vllm`` script)
import vllm.v1.engine.core  # noqa: E402, F401
import vllm.v1.executor.uniproc_executor  # noqa: E402, F401
import vllm.v1.worker.cpu_model_runner  # noqa: E402, F401
import vllm.v1.worker.cpu_worker  # noqa: E402, F401

import vllm_ernie_moe.patches  # noqa: E402, F401

if len(os.listdir("/proc/self/task")) != 1:
    # A child forked now would not have those threads (OpenMP's among them): let vLLM spawn.
    print("vllm-ernie-moe: the engine-core server started threads; exiting", file=sys.stderr)
    os._exit(0)
