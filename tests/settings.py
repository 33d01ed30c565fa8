"""Environment variables only the tests read (the package's own: ``vllm_ernie_moe.envs``)."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vllm_ernie_moe import envs


def ascend_source_dir() -> Path | None:
    """``VLLM_ERNIE_MOE_ASCEND_SRC``: a vllm-ascend source tree for the Ascend contract check
    (``tests/test_ascend_contract.py``, ``tests/test_upstream_fixes.py``); unset: skipped."""
    path = os.environ.get("VLLM_ERNIE_MOE_ASCEND_SRC")
    return Path(path) if path else None


def vllm_wheel_dir() -> Path:
    """``VLLM_ERNIE_MOE_VLLM_WHEELS``: vLLM wheels whose source ``tests/test_vllm_api.py`` checks
    the package's imports against (``make vllm-wheels`` fills it); default: ``wheels`` under
    ``VLLM_ERNIE_MOE_CACHE_DIR`` (``~/.cache/vllm-ernie-moe``), as in the Makefile."""
    return Path(os.environ.get("VLLM_ERNIE_MOE_VLLM_WHEELS", envs.cache_dir() / "wheels"))


#: vLLM's variable that keeps an engine in the process that makes it (``0``: engine core and a
#: world-size-1 worker; larger worlds still start their workers). The tests set it (conftest.py):
#: a tiny engine starts in about a third of the time (tests/test_w4a16.py + tests/test_lora.py,
#: 31 s against 77 s on a Zen 4 host). The user-facing entry points, the dialog example and
#: ``vllm serve``, are tested in vLLM's default layout (:func:`default_process_layout`).
ONE_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def default_process_layout() -> Iterator[None]:
    """Processes started inside start vLLM in its default layout (engine core and worker in
    processes of their own), as users run it."""
    saved = os.environ.pop(ONE_PROCESS, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ONE_PROCESS] = saved
