"""Patch: vLLM's oneDNN GEMM handler, collected while a torch mode is active, is never released.

- Target: ``vllm._custom_ops.CPUDNNLGEMMHandler.__del__`` (vLLM 0.27.1, 0.32.0, 0.33.0: the same
  code).
- Why: the handler releases its oneDNN matmul handler with a tensor op,
  ``self.dtor(self.handler_tensor.item())``. The garbage collector runs ``__del__`` wherever it
  happens to run, also inside a torch mode: in a process that makes several engines (a script with
  several ``LLM`` objects, the test suite), an old engine's handlers are collected while a new
  engine compiles. Under a FakeTensorMode ``.item()`` raises an AssertionError, so the handler
  leaks; once, in the 0.27.1 test suite, it recursed until a RecursionError that left torch's
  Python dispatch key excluded on the thread, and every later torch.compile in the process failed
  ("you set no_dispatch()"; docs/results/dispatch-key-leak-0.27.1-zen4.txt).
  What the collector interrupted, seen in that suite (0.27.1): a trace whose thread included the
  Meta, Functionalize and PythonDispatcher dispatch keys; by hand, ``.item()`` with Meta included
  raises "cannot be called on meta tensors", and with the Python dispatcher on as well it recurses
  until a RecursionError (docs/results/dispatch-key-leak-0.27.1-zen4.txt).
- How: ``__del__`` runs with torch's function modes off and the dispatch keys a new thread has
  (``torch._C._ForceDispatchKeyGuard``: no dispatch mode, no meta, no functionalization, no Python
  dispatcher), so that ``.item()`` and the release reach the CPU kernels; the guards restore the
  thread's state after.
- Applied when a process imports ``vllm._custom_ops`` (``patching.when_imported``), on CPU.
- Decided by the target's source: the patch applies while ``__del__`` reads the pointer with
  ``.item()``.
- Upstream: not reported yet. The upstream fix: keep the pointer as a Python int beside the
  tensor and release it with torch's modes off (docs/upstream/README.md).
- Remove when: vLLM's handler releases itself without a tensor op, or with torch's modes off.
- Test: ``tests/test_patch_cpu_onednn_handler_release.py``.
"""

from __future__ import annotations

import functools
import inspect
import threading
from types import ModuleType

import torch
from vllm.platforms import current_platform

from vllm_ernie_moe.patches.patching import install, when_imported

CUSTOM_OPS_MODULE = "vllm._custom_ops"
TARGET = "CPUDNNLGEMMHandler.__del__"


def _fresh_thread_dispatch_keys() -> tuple[torch._C.DispatchKeySet, torch._C.DispatchKeySet]:
    """The dispatch keys a new thread includes and excludes: no mode, no tracing, no meta."""
    keys = []
    reader = threading.Thread(
        target=lambda: keys.extend(
            (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        )
    )
    reader.start()
    reader.join()
    return keys[0], keys[1]


def releases_outside_torch_modes(release):
    """``__del__`` that runs ``release`` with torch's function modes off and the dispatch keys
    of a new thread, whatever the collector interrupted."""
    fresh_keys = _fresh_thread_dispatch_keys()
    # Bound here: at interpreter exit module globals (``torch``) may already be None.
    functions_off, force_keys = torch._C.DisableTorchFunction, torch._C._ForceDispatchKeyGuard

    @functools.wraps(release)
    def __del__(self) -> None:
        with functions_off(), force_keys(*fresh_keys):
            release(self)

    return __del__


def _releases_with_a_tensor_op_source(source: str) -> bool:
    return "handler_tensor.item()" in source


def _releases_with_a_tensor_op(release) -> bool:
    return _releases_with_a_tensor_op_source(inspect.getsource(release))


def apply() -> bool:
    """Release vLLM's oneDNN handlers outside torch's modes once ``vllm._custom_ops`` is imported;
    idempotent. True when active, or on CPU with the module not imported yet."""
    if not current_platform.is_cpu():
        return False
    return when_imported(CUSTOM_OPS_MODULE, _install) is not False


def _install(custom_ops: ModuleType) -> bool:
    return install(
        __name__, custom_ops.CPUDNNLGEMMHandler, "__del__", releases_outside_torch_modes,
        bug_present=_releases_with_a_tensor_op,
        fixed="released with torch's modes off",
    )  # fmt: skip
