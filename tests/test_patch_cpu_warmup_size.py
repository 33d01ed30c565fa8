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


def config(kv_cache_bytes, mode=CompilationMode.VLLM_COMPILE, inductor=None, batched_tokens=4096):
    """The parts of a vLLM config that the decision reads."""
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=mode, inductor_compile_config=inductor or {}),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_cache_bytes),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=batched_tokens),
    )


OURS, OTHER = "vllm_ernie_moe.model", "vllm.model_executor.models.llama"
EXPLICIT_KV = 2**30

#: (vLLM config, model module, brief warm-up tokens, the warm-up forward's tokens)
CASES = {
    "ernie-explicit-kv": (config(EXPLICIT_KV), OURS, patch.WARMUP_TOKENS, patch.WARMUP_TOKENS),
    "fewer-batched-tokens": (config(EXPLICIT_KV, batched_tokens=8), OURS, 8, 8),
    # vLLM sizes the KV cache from the RSS of the full-size forward
    "auto-kv": (config(None), OURS, None, 4096),
    "auto-kv-2048": (config(None, batched_tokens=2048), OURS, None, 2048),
    "other-model": (config(EXPLICIT_KV), OTHER, None, 4096),
    "eager": (config(EXPLICIT_KV, mode=CompilationMode.NONE), OURS, None, 0),
    # autotuning would tune Inductor's GEMMs to the warm-up's size
    "max-autotune": (config(EXPLICIT_KV, inductor={"max_autotune": True}), OURS, None, 4096),
}


@pytest.mark.parametrize("case", CASES)
def test_brief_warmup_only_where_nothing_reads_the_full_one(case, monkeypatch):
    vllm_config, module, brief, forward = CASES[case]
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    assert patch.brief_warmup_tokens(vllm_config, module) == brief
    assert patch.warmup_forward_tokens(vllm_config, module) == forward
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", "1")
    assert patch.brief_warmup_tokens(vllm_config, module) is None
    full = 0 if case == "eager" else vllm_config.scheduler_config.max_num_batched_tokens
    assert patch.warmup_forward_tokens(vllm_config, module) == full


@pytest.mark.parametrize(
    "case", ["ernie-explicit-kv", "fewer-batched-tokens", "auto-kv", "max-autotune"]
)
def test_the_patched_warmup_runs_a_forward_of_the_size_the_ranks_compare(case, monkeypatch):
    """The ranks compare ``warmup_forward_tokens`` at load (the model's ``loaded_as``): the size of
    the forward the patched ``warming_up_model`` runs, brief or vLLM's."""
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    runner_module = __import__(patch.RUNNER_MODULE, fromlist=["_set_global_compilation_settings"])
    monkeypatch.setattr(runner_module, "_set_global_compilation_settings", lambda _: nullcontext())
    monkeypatch.setattr(patch, "get_pp_group", lambda: SimpleNamespace(is_last_rank=False))
    vllm_config, module, _, forward = CASES[case]
    forwards: list[int] = []
    model = type("Model", (), {"__module__": module})()
    runner = SimpleNamespace(
        vllm_config=vllm_config, get_model=lambda: model,
        max_num_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        _dummy_run=lambda tokens, is_profile: forwards.append(tokens) or (None, None),
    )  # fmt: skip
    patch.warms_up_briefly(lambda runner: forwards.append(runner.max_num_tokens))(runner)
    assert forwards == [forward]


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
