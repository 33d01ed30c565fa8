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


def config(kv_cache_bytes, mode=CompilationMode.VLLM_COMPILE, inductor=None, batched_tokens=4096):
    """The parts of a vLLM config that the decision reads."""
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=mode, inductor_compile_config=inductor or {}),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_cache_bytes),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=batched_tokens),
        parallel_config=SimpleNamespace(node_rank=1, data_parallel_size=1),
    )


OURS, OTHER = "vllm_ernie_moe.model", "vllm.model_executor.models.llama"


@pytest.mark.parametrize(
    "case, module, expected",
    [
        (config(2**30), OURS, patch.WARMUP_TOKENS),
        (config(2**30, batched_tokens=8), OURS, 8),
        (config(None), OURS, None),  # vLLM sizes the KV cache from the RSS of the full-size forward
        (config(2**30), OTHER, None),
        (config(2**30, mode=CompilationMode.NONE), OURS, None),
        (config(2**30, inductor={"max_autotune": True}), OURS, None),  # tunes GEMMs to the size
    ],
    ids=[
        "ernie-explicit-kv",
        "fewer-batched-tokens",
        "auto-kv",
        "other-model",
        "eager",
        "max-autotune",
    ],
)
def test_brief_warmup_only_where_nothing_reads_the_full_one(case, module, expected, monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    assert patch.brief_warmup_tokens(case, module) == expected
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", "1")
    assert patch.brief_warmup_tokens(case, module) is None


class Disagreeing(RuntimeError):
    pass


@pytest.mark.parametrize(
    "vllm_config, module, compared",
    [
        (config(2**30), OURS, "16"),
        (config(None), OURS, "4096"),  # vLLM's warm-up: its runner's max_num_tokens
        (config(2**30), OTHER, None),  # another model's warm-up is not compared
    ],
    ids=["brief", "vllm-full", "other-model"],
)
def test_the_ranks_compare_the_warmup_size_before_the_forward(
    vllm_config, module, compared, monkeypatch
):
    """A rank whose warm-up size differs from rank 0's refuses before its forward, whose
    collectives would otherwise not match (the all-gather itself: tests/test_rank_agreement.py
    and the multi-node tests)."""
    monkeypatch.delenv("VLLM_ERNIE_MOE_FULL_WARMUP", raising=False)
    seen: list[tuple[str, dict]] = []

    def disagree(where, loaded):
        seen.append((where, loaded))
        raise Disagreeing

    monkeypatch.setattr(patch, "require_same_model_on_every_rank", disagree)
    forwards: list[str] = []
    model = type("Model", (), {"__module__": module})()
    runner = SimpleNamespace(
        vllm_config=vllm_config, get_model=lambda: model, max_num_tokens=4096
    )  # fmt: skip
    warming_up = patch.warms_up_briefly(lambda runner: forwards.append("vLLM's"))
    if compared is None:
        warming_up(runner)
        assert seen == [] and forwards == ["vLLM's"]
        return
    with pytest.raises(Disagreeing):
        warming_up(runner)
    [(where, loaded)] = seen
    assert where.startswith("node 1 (") and loaded == {"warm-up tokens": compared}
    assert forwards == []


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
