"""Shared fixtures: small ERNIE-4.5-MoE checkpoints built with transformers, engine settings."""

import atexit
import os
import re
import shutil
import tempfile
import warnings

import settings
from child_process import tagged_json

from vllm_ernie_moe import compat, cpu_tier, envs

# VLLM_ERNIE_MOE_CPU_TIER (make test CPU_TIER=avx2): torch, oneDNN, vLLM and every engine process
# run as that tier; before torch runs a kernel and before a test module imports vLLM's kernels.
cpu_tier.force()
# A small KV cache and both cores for the engine; set before vLLM reads its environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# Engines in the process that makes them: a third of the start-up time (settings.ONE_PROCESS).
os.environ.setdefault(settings.ONE_PROCESS, "0")
# Repacked weights in a directory of this session: each run starts without entries (no state
# from an earlier run), and later engines on the same weights load what earlier ones stored.
_REPACK_CACHE = tempfile.mkdtemp(prefix="ernie-moe-repack-")
atexit.register(shutil.rmtree, _REPACK_CACHE, ignore_errors=True)
os.environ.setdefault(envs.REPACK_CACHE_VARIABLE, _REPACK_CACHE)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_ernie_moe.tools.random_checkpoint import build_checkpoint  # noqa: E402

#: The keys a no_dispatch() guard excludes from torch's dispatch on this thread while it is active.
_NO_DISPATCH_KEYS = [
    getattr(torch._C.DispatchKey, key) for key in ("Python", "PythonTLSSnapshot", "PreDispatch")
]


def _excluded_no_dispatch_keys() -> list[str]:
    excluded = torch._C._dispatch_tls_local_exclude_set()
    return [key.name for key in _NO_DISPATCH_KEYS if excluded.has(key)]


def _clear_excluded_no_dispatch_keys(when: str) -> None:
    left = _excluded_no_dispatch_keys()
    if left:
        for key in _NO_DISPATCH_KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        warnings.warn(f"torch's dispatch keys {left} were left excluded {when}", stacklevel=2)


@pytest.fixture(autouse=True)
def dispatch_keys_kept():
    """Clear torch's Python dispatch keys if they are left excluded on this thread before or after
    a test (fixtures included), with a warning that names it. Left excluded, they fail every later
    torch.compile in this process ("you set no_dispatch()"): one CI run of the 0.27.1 suite failed
    so from test_portable_kernels on (8 failures, 6 errors). The cause, seen once here after
    test_parity's compiled engine: vLLM's oneDNN GEMM handlers release themselves in ``__del__``
    with a tensor op (``CPUDNNLGEMMHandler``, vLLM 0.27.1 and 0.32); collected by the garbage
    collector of this many-engine process while a torch mode was active, that op recursed until a
    RecursionError (docs/results/dispatch-key-leak-0.27.1-zen4.txt). The plugin now releases them
    outside torch's modes (patches/patch_cpu_onednn_handler_release.py); this guard stays for
    whatever else might leave the keys excluded."""
    _clear_excluded_no_dispatch_keys("before this test")
    yield
    _clear_excluded_no_dispatch_keys("after this test")


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


def _pairing(source: Path) -> str:
    """The vLLM release vllm-ascend pairs with: its git tree's tag file, or for the exported copy
    in ``../shared`` (no ``.github``) the pairing its PROVENANCE.md records."""
    tag = source / ".github" / "vllm-release-tag.commit"
    if tag.exists():
        return tag.read_text().strip().lstrip("v")
    provenance = (source / "PROVENANCE.md").read_text()
    return re.search(r"pairs with vLLM v?([0-9.]+[0-9])", provenance).group(1)


@pytest.fixture(scope="session", params=["A2", "_310P"])
def contract(request):
    """What vllm-ascend's own code does with the model on CPU, per device
    (ascend_contract_probe.py); skipped without a vllm-ascend tree paired with this vLLM."""
    source = settings.ascend_source_dir()
    if source is None:
        pytest.skip("set VLLM_ERNIE_MOE_ASCEND_SRC to a vllm-ascend source tree")
    paired = _pairing(source)
    if compat.vllm_version().base_version != paired:
        pytest.skip(f"vllm-ascend at {source} pairs with vLLM {paired}")
    probe = Path(__file__).with_name("ascend_contract_probe.py")
    return tagged_json([str(probe), str(source), request.param], "CONTRACT", timeout=900)
