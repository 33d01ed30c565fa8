"""patch_cpu_warmup_size: the brief warm-up runs only where nothing reads vLLM's full-size one.

The engine check (the graph traced on the 16-token warm-up is the one traced on vLLM's full-size
warm-up, and the engine answers the same) shares its engine starts with patch_cpu_aot_compile_cache:
``tests/test_patch_cpu_aot_compile_cache.py::test_second_start_loads_the_saved_compilation``."""

import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
from vllm.config import CompilationMode

from vllm_ernie_moe.patches import patch_cpu_warmup_size as patch
from vllm_ernie_moe.patches.patching import is_patched, unpatched


def test_unpatched_vllm_warms_up_through_profile_run():
    """The cost the patch exists for; when this fails, vLLM's warm-up changed: re-check it."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert patch._warms_up_through_profile_run(unpatched(CPUModelRunner.warming_up_model))


def config(
    kv_cache_bytes, mode=CompilationMode.VLLM_COMPILE, inductor=None, batched_tokens=4096, seqs=8
):
    """The parts of a vLLM config that the decision reads."""
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=mode, inductor_compile_config=inductor or {}),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_cache_bytes),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=batched_tokens, max_num_seqs=seqs),
    )


OURS, OTHER = "vllm_ernie_moe.model", "vllm.model_executor.models.llama"
EXPLICIT_KV = 2**30
EAGER = CompilationMode.NONE

#: vLLM config, model module, brief warm-up tokens
CASES = {
    "ernie-explicit-kv": (config(EXPLICIT_KV), OURS, patch.WARMUP_TOKENS),
    "fewer-batched-tokens": (config(EXPLICIT_KV, batched_tokens=8), OURS, 8),
    "more-seqs": (config(EXPLICIT_KV, seqs=256), OURS, patch.WARMUP_TOKENS),
    # vLLM sizes the KV cache from the RSS of the full-size forward
    "auto-kv": (config(None), OURS, None),
    "auto-kv-2048": (config(None, batched_tokens=2048), OURS, None),
    "other-model": (config(EXPLICIT_KV), OTHER, None),
    "eager": (config(EXPLICIT_KV, mode=EAGER), OURS, None),
    "eager-auto-kv": (config(None, mode=EAGER), OURS, None),
    # autotuning would tune Inductor's GEMMs to the warm-up's size
    "max-autotune": (config(EXPLICIT_KV, inductor={"max_autotune": True}), OURS, None),
}


@pytest.mark.parametrize("case", CASES)
def test_brief_warmup_only_where_nothing_reads_the_full_one(case, monkeypatch):
    vllm_config, module, brief = CASES[case]
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    assert patch.brief_warmup_tokens(vllm_config, module) == brief
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", "1")
    assert patch.brief_warmup_tokens(vllm_config, module) is None


def warm_up_as_vllm_does(vllm_config, module: str, monkeypatch) -> tuple[list[int], list[int]]:
    """The tokens of the dummy forward and the rows of the dummy sampler run that a CPU worker's
    warm-up runs: vLLM's own worker rule, its (patched) ``warming_up_model`` and its
    ``profile_run``; only the dummy runs themselves are stand-ins that record their sizes."""
    from vllm.v1.worker import cpu_model_runner, gpu_model_runner
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    last_rank = lambda: SimpleNamespace(is_last_rank=True)  # noqa: E731
    monkeypatch.setattr(gpu_model_runner, "get_pp_group", last_rank)
    monkeypatch.setattr(patch, "get_pp_group", last_rank)
    monkeypatch.setattr(
        cpu_model_runner, "_set_global_compilation_settings", lambda _: nullcontext()
    )
    forwards: list[int] = []
    sampled: list[int] = []

    class Runner:
        warming_up_model = patch.warms_up_briefly(unpatched(CPUModelRunner.warming_up_model))
        profile_run = GPUModelRunner.profile_run
        supports_mm_inputs = is_pooling_model = False
        encoder_cache: dict = {}

        def __init__(self) -> None:
            self.vllm_config = vllm_config
            self.max_num_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs

        def get_model(self):
            return type("Model", (), {"__module__": module})()

        def _dummy_run(self, tokens, is_profile, **_):
            forwards.append(tokens)
            return None, list(range(min(tokens, self.max_num_reqs)))  # a row per dummy request

        def _dummy_sampler_run(self, last_hidden_states):
            sampled.append(len(last_hidden_states))

        def _sync_device(self) -> None:
            pass

    worker_rule = getattr(CPUWorker, "_should_warm_up_model", lambda _: True)
    if worker_rule(SimpleNamespace(**vars(vllm_config))):
        Runner().warming_up_model()
    return forwards, sampled


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("full_warmup", ["0", "1"])
def test_the_ranks_compare_what_the_warmup_runs(case, full_warmup, monkeypatch):
    """The model's rank agreement compares ``warmup_collectives``: it must be what the warm-up
    runs, brief, vLLM's or none, on either vLLM."""
    vllm_config, module, _ = CASES[case]
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", full_warmup)
    forwards, sampled = warm_up_as_vllm_does(vllm_config, module, monkeypatch)
    described = patch.warmup_collectives(vllm_config, module)
    if not forwards:
        assert described == "none"
        return
    [tokens], [rows] = forwards, sampled
    assert described == f"{tokens} tokens, {rows} sampled"


def test_vllm_ci_variable_skips_the_warmup_where_vllm_skips_it(monkeypatch):
    """vLLM 0.32's worker skips the warm-up under ``VLLM_CPU_CI_ENV``; 0.27 warms up anyway."""
    import vllm.envs

    vllm_config, module, _ = CASES["ernie-explicit-kv"]
    monkeypatch.setattr(vllm.envs, "VLLM_CPU_CI_ENV", True, raising=False)
    forwards, _ = warm_up_as_vllm_does(vllm_config, module, monkeypatch)
    described = patch.warmup_collectives(vllm_config, module)
    assert described == ("none" if not forwards else "16 tokens, 8 sampled")


def test_the_dummy_sampler_run_has_a_row_per_dummy_request():
    """What the stand-in ``_dummy_run`` above assumes of vLLM's: the profile run's batch is
    ``min(tokens, max_num_seqs)`` requests, and its sampler run computes (all-gathers, on CPU)
    their logits."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    dummy_run = inspect.getsource(GPUModelRunner._dummy_run)
    assert "num_reqs = min(num_tokens, max_num_reqs)" in dummy_run
    assert "max_num_reqs = self.scheduler_config.max_num_seqs" in dummy_run
    assert "self.model.compute_logits(hidden_states)" in inspect.getsource(
        GPUModelRunner._dummy_sampler_run
    )


def test_apply_is_idempotent():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert patch.apply() is True
    patched = CPUModelRunner.warming_up_model
    assert is_patched(patched)
    assert patch.apply() is True
    assert CPUModelRunner.warming_up_model is patched


def test_a_process_that_never_imports_the_runner_does_not_import_it_and_one_that_does_is_patched():
    """The API server never imports vLLM's CPU model runner (docs/results/plugin-load-zen4.txt); a
    worker, when it imports it, gets the patch."""
    code = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        f"print('imported', {patch.RUNNER_MODULE!r} in sys.modules)\n"
        "from vllm.v1.worker.cpu_model_runner import CPUModelRunner\n"
        "from vllm_ernie_moe.patches.patching import is_patched\n"
        "print('patched', is_patched(CPUModelRunner.warming_up_model))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [out for out in done.stdout.splitlines() if out.startswith(("imported", "patched"))]
    assert printed == ["imported False", "patched True"]  # vLLM 0.27 logs to stdout too
