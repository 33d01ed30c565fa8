"""Patch: vLLM never loads its saved torch.compile artefact on CPU; every start compiles again.

- Target: ``vllm.compilation.decorators._try_load_aot_compiled_fn`` (vLLM 0.27.1, 0.32.0, 0.33.0:
  the same code).
- Why: on CPU vLLM compiles in ``DYNAMO_TRACE_ONCE`` mode with torch's own Inductor backend and
  saves the result as an AOT artefact (``saved AOT compiled function to ...``). Loading it, torch
  hands back its Inductor function, already complete; vLLM then calls
  ``compiled_fn.finalize_loading(vllm_config)``, a method of vLLM's own backend's artefacts
  (``VllmSerializableFunction``) only. The ``AttributeError`` makes vLLM log "Compiling model again
  due to a load failure ... 'function' object has no attribute 'finalize_loading'" and compile
  from scratch at every start (71 s for the 28-layer 21B on a Zen 4 host; with the patch a
  second start loads it in 2 s: docs/results/startup-lines-28layers-w4a16-cached-zen4.txt).
- How: while vLLM loads an artefact, a loaded function without ``finalize_loading`` gets one that
  does nothing (torch's deserialization already did the loading). vLLM's own artefacts are left as
  they are; vLLM's checks (source files changed, guards) still run.
- Decided by the target's source: the patch applies when ``_try_load_aot_compiled_fn`` calls
  ``finalize_loading`` without asking whether the function has it.
- Upstream: no issue found; the fix is a ``hasattr`` check before the call.
- Remove when: vLLM loads a CPU artefact without it ("Directly load AOT compilation" in the log
  of a second start; the plugin logs "not needed" once the call is guarded).
- Test: ``tests/test_patch_cpu_aot_compile_cache.py`` (two engine starts on one cache).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect

import torch

from vllm_ernie_moe.patches.patching import install

DECORATORS_MODULE = "vllm.compilation.decorators"
TARGET = "_try_load_aot_compiled_fn"


def _already_loaded(vllm_config) -> None:
    """torch's Inductor artefacts are complete once deserialized."""


@contextlib.contextmanager
def _torch_artefacts_finalizable():
    """While active, functions torch loads from an AOT artefact answer ``finalize_loading``."""
    load = torch.compiler.load_compiled_function

    @functools.wraps(load)
    def loading(*args, **kwargs):
        loaded = load(*args, **kwargs)
        compiled = loaded._artifacts.compiled_fn
        if not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _already_loaded
        return loaded

    torch.compiler.load_compiled_function = loading
    try:
        yield
    finally:
        torch.compiler.load_compiled_function = load


def loads_torch_artefacts(try_load):
    """``_try_load_aot_compiled_fn`` that also loads artefacts of torch's own backends."""

    @functools.wraps(try_load)
    def wrapped(*args, **kwargs):
        with _torch_artefacts_finalizable():
            return try_load(*args, **kwargs)

    return wrapped


def _finalizes_unguarded_source(source: str) -> bool:
    return ".finalize_loading(" in source and '"finalize_loading"' not in source


def _finalizes_unguarded(try_load) -> bool:
    return _finalizes_unguarded_source(inspect.getsource(try_load))


def apply() -> bool:
    """Patch vLLM's AOT artefact loader if it calls ``finalize_loading`` unguarded; idempotent."""
    decorators = importlib.import_module(DECORATORS_MODULE)
    return install(
        __name__, decorators, TARGET, loads_torch_artefacts,
        bug_present=_finalizes_unguarded,
        fixed="torch's Inductor artefacts load without vLLM's finalize_loading",
    )  # fmt: skip
