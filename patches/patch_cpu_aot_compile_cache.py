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
- Second target, needed once artefacts load: ``vllm.compilation.caching.aot_compile_hash_factors``
  (the artefact's key: vLLM's environment and config, not the plugin's). The plugin's switches
  change the traced graph (``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS=0`` swaps the W4A16 linears'
  kernel and parameters, ``VLLM_ERNIE_MOE_SGL_KERNELS`` the GEMMs, the CPU tier every kernel), so
  a start with another setting loaded the graph of the first: a ``KeyError: 'weight_zero'`` in the
  warm-up. The key now also holds those settings as in effect (``envs.build_settings``), the CPU
  features the kernels are chosen by (as torch's probes answer, so a forced tier counts), and a
  digest of the plugin's source (kernel choices made in files Dynamo never traces). On CPU even
  once vLLM loads artefacts itself.
- Upstream: no issue found; the fix is a ``hasattr`` check before the call, and a way for plugins
  to add to the artefact's key.
- Remove when: the loader part, once vLLM loads a CPU artefact without it ("Directly load AOT
  compilation" in the log of a second start; the plugin logs "not needed" once the call is
  guarded); the key part, once vLLM's key takes factors from plugins.
- Test: ``tests/test_patch_cpu_aot_compile_cache.py`` (engine starts on one cache: the same
  settings load the artefact, another plugin setting compiles anew).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect

import torch
from vllm.platforms import current_platform

import vllm_ernie_moe
from vllm_ernie_moe import envs
from vllm_ernie_moe.cpu_tier import TORCH_PROBES
from vllm_ernie_moe.patches.patching import install

DECORATORS_MODULE = "vllm.compilation.decorators"
TARGET = "_try_load_aot_compiled_fn"
CACHING_MODULE = "vllm.compilation.caching"
KEY_TARGET = "aot_compile_hash_factors"


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


def plugin_factors() -> list[str]:
    """What of the plugin decides the traced graph besides vLLM's factors: its build settings, the
    CPU features its kernels are chosen by, and its source."""
    features = [name for name in TORCH_PROBES if getattr(torch.cpu, f"_is_{name}_supported")()]
    return [*envs.build_settings(), f"cpu {'+'.join(features)}", vllm_ernie_moe.source_digest()]


def keyed_by_plugin_settings(hash_factors):
    """``aot_compile_hash_factors`` that also holds :func:`plugin_factors`."""

    @functools.wraps(hash_factors)
    def wrapped(vllm_config) -> list[str]:
        return [*hash_factors(vllm_config), *plugin_factors()]

    return wrapped


def _finalizes_unguarded_source(source: str) -> bool:
    return ".finalize_loading(" in source and '"finalize_loading"' not in source


def _finalizes_unguarded(try_load) -> bool:
    return _finalizes_unguarded_source(inspect.getsource(try_load))


def apply() -> bool:
    """Patch vLLM's AOT artefact loader if it calls ``finalize_loading`` unguarded, and on CPU the
    artefacts' key; idempotent. True when the loader is patched."""
    decorators = importlib.import_module(DECORATORS_MODULE)
    loads = install(
        __name__, decorators, TARGET, loads_torch_artefacts,
        bug_present=_finalizes_unguarded,
        fixed="torch's Inductor artefacts load without vLLM's finalize_loading",
    )  # fmt: skip
    if current_platform.is_cpu():
        install(
            __name__, importlib.import_module(CACHING_MODULE), KEY_TARGET,
            keyed_by_plugin_settings,
            fixed="the key holds the plugin's build settings, CPU features and source",
        )  # fmt: skip
    return loads
