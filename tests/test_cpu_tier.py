"""The tier switch: a forced tier reaches torch, oneDNN, vLLM's library choice and engine
processes; a tier above the host's is refused."""

import os
import subprocess
import sys

import pytest

from vllm_ernie_moe import cpu_tier


def run_as(tier: str, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, cpu_tier.TIER_VARIABLE: tier}
    return subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.cpu_tier", tier, sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


REPORT = (
    "import torch, torch._inductor.config as inductor, vllm._custom_ops; "
    "from vllm_ernie_moe import cpu_tier; "
    "print(cpu_tier.loaded_library(), torch.backends.cpu.get_cpu_capability(), "
    "torch.cpu._is_avx512_supported(), torch.cpu._is_vnni_supported(), inductor.cpp.march)"
)


@pytest.mark.parametrize("tier", cpu_tier.TIERS, ids=lambda t: t.name)
def test_forced_tier_loads_its_library(tier):
    host = cpu_tier.host_tier()
    if host is None or cpu_tier.TIERS.index(tier) > cpu_tier.TIERS.index(host):
        pytest.skip(f"this host's tier is {host.name if host else 'below AVX2'}")
    done = run_as(tier.name, REPORT)
    assert done.returncode == 0, done.stderr[-2000:]
    library, capability, avx512, vnni, march = done.stdout.split()[-5:]
    assert library == tier.library
    assert capability.lower() == tier.aten_capability
    assert (avx512, vnni) == (str(tier.avx512), str(tier.vnni))
    # torch.compile builds for the tier, not -march=native (garbage at TP=2 otherwise: cpu_tier.py)
    expected_march = {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}.get(tier.name, "None")
    assert march == expected_march


def tier_above_the_host() -> cpu_tier.Tier:
    host = cpu_tier.host_tier()
    if host is cpu_tier.TIERS[-1]:
        pytest.skip("this host runs every tier")
    return cpu_tier.TIERS[cpu_tier.TIERS.index(host) + 1]


def test_tier_above_the_host_is_refused():
    done = run_as(tier_above_the_host().name, "print('ran')")
    assert done.returncode != 0
    assert "cannot execute that tier" in done.stderr
    assert "ran" not in done.stdout


def test_process_started_with_a_tier_above_the_host_ends():
    """A process started with the tier's variables, as vLLM starts its engine processes: Python
    reports an error of sitecustomize and goes on, so the refusal must end the process itself."""
    env = {**os.environ, **cpu_tier.environment(tier_above_the_host())}
    done = subprocess.run(
        [sys.executable, "-c", "print('ran')"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "cannot execute that tier" in done.stderr
    assert "ran" not in done.stdout and "Traceback" not in done.stderr


def test_unknown_tier_names_the_choices():
    done = run_as("avx9", "pass")
    assert done.returncode != 0
    assert "avx2, avx512, avx512_bf16" in done.stderr


#: vLLM's config for an fp8 KV cache (the config hooks run; no engine starts).
FP8_KV_CONFIG = (
    "import sys; from vllm.engine.arg_utils import EngineArgs\n"
    "try:\n"
    "    EngineArgs(model=sys.argv[1], kv_cache_dtype='fp8', max_model_len=128)"
    ".create_engine_config()\n"
    "except Exception as error:\n"
    "    print('REFUSED', error)\n"
)


@pytest.mark.parametrize("tier", ["avx2", "avx512"])
def test_fp8_kv_cache_is_refused_before_start_where_cpu_attention_lacks_it(checkpoint, tier):
    """vLLM's CPU attention runs an fp8 KV cache only with AVX-512 or AMX; as AVX2 its workers
    died after loading the weights. Refused at config time with the fix on AVX2, accepted on
    AVX-512 (it serves there: tests/test_parity.py's fp8 engine)."""
    host = cpu_tier.host_tier()
    wanted = cpu_tier.TIERS_BY_NAME[tier]
    if host is None or cpu_tier.TIERS.index(wanted) > cpu_tier.TIERS.index(host):
        pytest.skip(f"this host cannot run the {tier} tier")
    done = run_as(tier, FP8_KV_CONFIG, str(checkpoint("tiny-21b")))
    refused = "--kv-cache-dtype fp8 cannot run on this CPU" in done.stdout
    assert refused == (tier == "avx2"), done.stdout[-2000:] + done.stderr[-2000:]
    if refused:
        assert "AVX-512" in done.stdout and "--kv-cache-dtype auto" in done.stdout
