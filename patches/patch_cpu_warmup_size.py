"""Patch: vLLM's CPU warm-up runs a full-size prefill only to compile; for ERNIE it costs ~50 s.

- Target: ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.warming_up_model`` (vLLM 0.27.1,
  0.32.0: the same code).
- Why: before the KV cache exists, vLLM's CPU worker runs ``profile_run()``: one dummy forward of
  ``max_num_batched_tokens`` tokens (4096 with ``LLM``'s defaults), then a dummy sampler run. It
  serves two ends: torch.compile's graphs ("Only generate graph for the generic shape", vLLM's
  comment; the batch dimension is dynamic), and, when the KV cache size is *not* explicit, the
  process's RSS after it, from which vLLM sizes the KV cache. For the 28-layer 21B-A3B on 2 cores
  that forward is a 4096-token prefill: 54.1 and 49.5 s of warm starts of 108.1 and 97.6 s
  (docs/results/startup-lines-28layers-w4a16-int8-inputs-zen4.txt).
- How: for this plugin's model, with an explicit KV cache size (``VLLM_CPU_KVCACHE_SPACE`` or
  ``--kv-cache-memory-bytes``, where the RSS is not read) and compilation on, the warm-up runs the
  same dummy forward on :data:`WARMUP_TOKENS` tokens instead, then the same dummy sampler run
  (vLLM 0.27 compiles its CPU sampler there). vLLM keeps no shape guards, so a branch on the token
  count taken while tracing would serve every size: the model's size branches are inside custom
  ops (``portable_kernels``, ``quant.int4.int4_linear``) or vLLM's C++ kernels, and the test
  requires the graphs traced on 16 tokens to be those traced on the full size. With Inductor's
  ``max_autotune`` (GEMM templates tuned to the warm-up's size), another model, an automatic KV
  cache size, or ``VLLM_ERNIE_MOE_FULL_WARMUP=1``, vLLM's warm-up runs. What the brief warm-up
  no longer shows at start: whether a full-size prefill's activations fit in memory (the first
  long prompt does).
  The nodes of a multi-node engine must warm up alike (the forward's and the sampler run's
  collectives): the model's rank agreement compares :func:`warmup_collectives` at load, which
  every rank reaches (vLLM 0.32's worker may skip ``warming_up_model`` on a node, so a comparison
  inside it could hang instead of refusing); the one function of a patch the runtime reads.
- Applied when a process imports ``cpu_model_runner`` (``patching.when_imported``): the API
  server never does; importing it there cost 0.06-0.13 s of the plugin's load
  (docs/results/plugin-load-zen4.txt).
- Decided by the target's source: the patch applies while ``warming_up_model`` warms up through
  ``profile_run()``.
- Upstream: no issue found. The upstream form would be a size argument to the CPU warm-up.
- Remove when: vLLM's CPU warm-up stops running a ``max_num_batched_tokens`` forward when the KV
  cache size is explicit (keep :func:`warmup_collectives`' description of vLLM's warm-up for the
  rank agreement).
- Test: ``tests/test_patch_cpu_warmup_size.py`` (where it applies) and
  ``tests/test_patch_cpu_aot_compile_cache.py::test_second_start_loads_the_saved_compilation``
  (the same traced graph and answers as after vLLM's full warm-up).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType

from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_pp_group
from vllm.logger import init_logger
from vllm.platforms import current_platform

from vllm_ernie_moe import compat, envs
from vllm_ernie_moe.patches.patching import install, when_imported

logger = init_logger(f"vllm.{__name__}")

RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"
#: Tokens of the brief warm-up: above 1, so that torch.compile does not specialize the batch
#: dimension to a size; a few requests' worth.
WARMUP_TOKENS = 16


def brief_warmup_tokens(vllm_config: VllmConfig, model_module: str) -> int | None:
    """Tokens for the brief warm-up of a model defined in ``model_module``, or None where vLLM's
    own warm-up must run."""
    if envs.full_warmup():
        return None
    compilation = vllm_config.compilation_config
    if compilation.mode == CompilationMode.NONE:
        return None  # vLLM's warm-up returns at once
    if compilation.inductor_compile_config.get("max_autotune", False):
        return None  # autotuning would tune Inductor's GEMMs to the warm-up's size
    if vllm_config.cache_config.kv_cache_memory_bytes is None:
        return None  # vLLM sizes the KV cache from the RSS the full-size forward leaves
    if not model_module.startswith("vllm_ernie_moe."):
        return None  # another model: its warm-up is not ours to change
    return min(WARMUP_TOKENS, vllm_config.scheduler_config.max_num_batched_tokens)


def warmup_collectives(vllm_config: VllmConfig, model_module: str) -> str:
    """What this rank's CPU warm-up runs through collectives: "none" (eager, or vLLM's worker
    skips it), else the dummy forward's tokens, brief or vLLM's (``max_num_batched_tokens``, the
    runner's ``max_num_tokens``), and the rows of the dummy sampler run after it (one per dummy
    request: ``min(tokens, max_num_seqs)``), whose logits are all-gathered. A node's own arguments
    and environment decide both; every rank must run them alike."""
    eager = vllm_config.compilation_config.mode == CompilationMode.NONE
    if eager or not compat.cpu_worker_warms_up(vllm_config):
        return "none"
    scheduler = vllm_config.scheduler_config
    tokens = brief_warmup_tokens(vllm_config, model_module) or scheduler.max_num_batched_tokens
    return f"{tokens} tokens, {min(tokens, scheduler.max_num_seqs)} sampled"


def warms_up_briefly(warm_up):
    """``warming_up_model`` that compiles on a :data:`WARMUP_TOKENS`-token forward where it may."""
    runner_module = importlib.import_module(RUNNER_MODULE)

    @functools.wraps(warm_up)
    def warming_up_model(self) -> None:
        tokens = brief_warmup_tokens(self.vllm_config, type(self.get_model()).__module__)
        if tokens is None:
            return warm_up(self)
        logger.info(
            "vllm-ernie-moe: warming up for the compilation on %d tokens, not %d (the KV cache "
            "size is explicit; VLLM_ERNIE_MOE_FULL_WARMUP=1 runs vLLM's full-size warm-up).",
            tokens, self.max_num_tokens,
        )  # fmt: skip
        with runner_module._set_global_compilation_settings(self.vllm_config):
            _, last_hidden_states = self._dummy_run(tokens, is_profile=True)
            if get_pp_group().is_last_rank:
                self._dummy_sampler_run(last_hidden_states)
        logger.info("Warming up done.")

    return warming_up_model


def _warms_up_through_profile_run(warm_up) -> bool:
    return "self.profile_run()" in inspect.getsource(warm_up)


def apply() -> bool:
    """Shorten vLLM's CPU warm-up for this plugin's model once vLLM's CPU model runner is imported
    (the API server never imports it); idempotent. True when active, or on CPU with the runner not
    imported yet (the probe runs then)."""
    if not current_platform.is_cpu():
        return False
    return when_imported(RUNNER_MODULE, _install) is not False


def _install(runner_module: ModuleType) -> bool:
    return install(
        __name__, runner_module.CPUModelRunner, "warming_up_model", warms_up_briefly,
        bug_present=_warms_up_through_profile_run,
        fixed=f"a {WARMUP_TOKENS}-token warm-up with an explicit KV cache size",
    )  # fmt: skip
