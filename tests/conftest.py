"""Shared fixtures: small ERNIE-4.5-MoE checkpoints built with transformers, engine settings."""

import os

from vllm_ernie_moe import cpu_tier

# VLLM_ERNIE_MOE_CPU_TIER (make test CPU_TIER=avx2): torch, oneDNN, vLLM and every engine process
# run as that tier; before torch runs a kernel and before a test module imports vLLM's kernels.
cpu_tier.force()
# A small KV cache and both cores for the engine; set before vLLM reads its environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vllm_ernie_moe.random_checkpoint import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(geometry, dtype="float32", mtp=False) -> a random checkpoint (with an MTP head),
    built once a session."""
    built: dict[tuple[str, str, bool], Path] = {}

    def get(geometry: str, dtype: str = "float32", mtp: bool = False) -> Path:
        key = (geometry, dtype, mtp)
        if key not in built:
            name = f"{geometry}-{dtype}{'-mtp' if mtp else ''}"
            built[key] = build_checkpoint(
                tmp_path_factory.mktemp(name), geometry, dtype=dtype, mtp=mtp
            )
        return built[key]

    return get
