"""docs/upstream/: each diff applies to the upstream source it names, and the upstream test that
comes with it fails on that source and passes with the diff applied (so both can fail)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import settings

from vllm_ernie_moe import compat

UPSTREAM = Path(__file__).resolve().parent.parent / "docs" / "upstream"
PROBE = Path(__file__).resolve().parent / "ascend_contract_probe.py"

#: Runs one upstream test file with MODULE loaded from FILE (the patched copy) when given.
RUNNER = """
import importlib, importlib.util, sys
test_file, module, file, stubs = sys.argv[1:5]
if stubs != "-":
    sys.path[:0] = [stubs, sys.argv[5]]
    import ascend_contract_probe
    ascend_contract_probe.install_npu_stubs("A2")
importlib.import_module(module)  # the original first: its package imports complete
if file != "-":
    spec = importlib.util.spec_from_file_location(module, file)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", test_file]))
"""


def apply_diff(diff: Path, source_root: Path, relative: str, tmp_path: Path) -> Path:
    """Copy ``relative`` from ``source_root`` into a scratch tree, apply ``diff``; the patched
    file."""
    tree = tmp_path / "tree"
    (tree / relative).parent.mkdir(parents=True)
    shutil.copy(source_root / relative, tree / relative)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "apply", str(diff)], check=True)
    return tree / relative


def run_upstream_test(test: str, module: str, patched: Path | None, ascend: Path | None):
    stubs = [str(PROBE.parent), str(ascend)] if ascend else ["-"]
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(UPSTREAM / test), module, str(patched or "-"), *stubs],
        capture_output=True,
        text=True,
        timeout=600,
    )


def fails_before_passes_after(test: str, module: str, patched: Path, ascend: Path | None):
    """The upstream test fails on the unpatched source and passes on the patched one; the
    failing run, for further checks."""
    before = run_upstream_test(test, module, None, ascend)
    assert before.returncode == 1, before.stdout[-2000:] + before.stderr[-2000:]
    after = run_upstream_test(test, module, patched, ascend)
    assert after.returncode == 0, after.stdout[-3000:] + after.stderr[-2000:]
    return before


def test_vllm_cpu_router_fix(tmp_path):
    if compat.cpu_router_class() is None:
        pytest.skip("this vLLM routes on CPU in cpu_fused_moe (0.27): the fix targets 0.32+")
    module = compat.CPU_ROUTER_MODULE
    relative = module.replace(".", "/") + ".py"
    import vllm

    patched = apply_diff(
        UPSTREAM / "cpu-router-bias.diff", Path(vllm.__file__).parent.parent, relative, tmp_path
    )
    fails_before_passes_after("test_cpu_router_bias.py", module, patched, None)


def test_vllm_ascend_grouped_topk_router_fix(tmp_path):
    source = settings.ascend_source_dir()
    if source is None:
        pytest.skip("set VLLM_ERNIE_MOE_ASCEND_SRC to a vllm-ascend source tree")
    module = "vllm_ascend.ops.fused_moe.router.grouped_topk_router"
    relative = module.replace(".", "/") + ".py"
    patched = apply_diff(
        UPSTREAM / "ascend-grouped-topk-router-bias.diff", source, relative, tmp_path
    )
    fails_before_passes_after("test_grouped_topk_router_bias.py", module, patched, source)


#: The vLLM releases ``ernie-mtp.diff`` is written against (0.27's ernie_mtp.py differs).
ERNIE_MTP_DIFF_TARGETS = ("0.32.0", "0.33.0")


def test_vllm_ernie_mtp_fix(tmp_path):
    import vllm

    module = "vllm.model_executor.models.ernie_mtp"
    relative = module.replace(".", "/") + ".py"
    if compat.vllm_version().base_version not in ERNIE_MTP_DIFF_TARGETS:
        pytest.skip(f"the diff is against vLLM 0.32/0.33's {relative}, not {vllm.__version__}'s")
    # On a vLLM the diff targets, a diff that no longer applies fails here.
    patched = apply_diff(
        UPSTREAM / "ernie-mtp.diff", Path(vllm.__file__).parent.parent, relative, tmp_path
    )
    before = fails_before_passes_after("test_ernie_mtp_reference.py", module, patched, None)
    assert "3 failed" in before.stdout, before.stdout[-2000:]  # each departure shows
