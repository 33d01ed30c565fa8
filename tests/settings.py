"""Environment variables only the tests read (the package's own: ``vllm_ernie_moe.envs``)."""

import os
from pathlib import Path


def ascend_source_dir() -> Path | None:
    """``VLLM_ERNIE_MOE_ASCEND_SRC``: a vllm-ascend source tree for the Ascend contract check
    (``tests/test_ascend_contract.py``, ``tests/test_upstream_fixes.py``); unset: skipped."""
    path = os.environ.get("VLLM_ERNIE_MOE_ASCEND_SRC")
    return Path(path) if path else None


def vllm_wheel_dir() -> Path:
    """``VLLM_ERNIE_MOE_VLLM_WHEELS``: vLLM wheels whose source ``tests/test_vllm_api.py`` checks
    the package's imports against (``make vllm-wheels`` fills it); default: ``wheels`` under
    ``VLLM_ERNIE_MOE_CACHE_DIR`` (``~/.cache/vllm-ernie-moe``), as in the Makefile."""
    cache = os.environ.get(
        "VLLM_ERNIE_MOE_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "vllm-ernie-moe"),
    )
    return Path(os.environ.get("VLLM_ERNIE_MOE_VLLM_WHEELS", os.path.join(cache, "wheels")))
