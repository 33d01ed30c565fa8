"""patch_cpu_warmup_size: the brief warm-up runs only where nothing reads vLLM's full-size one.

The engine check (the graph traced on the 16-token warm-up is the one traced on vLLM's full-size
warm-up, and the engine answers the same) shares its engine starts with patch_cpu_aot_compile_cache:
``tests/test_patch_cpu_aot_compile_cache.py::test_second_start_loads_the_saved_compilation``."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from vllm.config import CompilationMode

from vllm_ernie_moe.patches import patch_cpu_warmup_size as patch
from vllm_ernie_moe.patches.patching import is_patched, unpatched


def test_unpatched_vllm_warms_up_through_profile_run():
    """The cost the patch exists for; when this fails, vLLM's warm-up changed: re-check it."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert patch._warms_up_through_profile_run(unpatched(CPUModelRunner.warming_up_model))


def runner(
    kv_cache_bytes, module="vllm_ernie_moe.model", mode=CompilationMode.VLLM_COMPILE, inductor=None
):
    """The attributes of a CPU model runner that the decision reads."""
    model = type("Model", (), {"__module__": module})()
    compilation = SimpleNamespace(mode=mode, inductor_compile_config=inductor or {})
    return SimpleNamespace(
        vllm_config=SimpleNamespace(compilation_config=compilation),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_cache_bytes),
        get_model=lambda: model,
        max_num_tokens=4096,
    )


@pytest.mark.parametrize(
    "case, expected",
    [
        (runner(2**30), patch.WARMUP_TOKENS),
        (runner(None), None),  # vLLM sizes the KV cache from the RSS of the full-size forward
        (runner(2**30, module="vllm.model_executor.models.llama"), None),
        (runner(2**30, mode=CompilationMode.NONE), None),
        (runner(2**30, inductor={"max_autotune": True}), None),  # tunes GEMMs to the size
    ],
    ids=["ernie-explicit-kv", "auto-kv", "other-model", "eager", "max-autotune"],
)
def test_brief_warmup_only_where_nothing_reads_the_full_one(case, expected, monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    assert patch.brief_warmup_tokens(case) == expected
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", "1")
    assert patch.brief_warmup_tokens(case) is None


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
