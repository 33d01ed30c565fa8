"""The parity checker's real CLI: passes on a correct model, flags a corrupted expert."""

import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file


def run_parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_ernie_moe.tools.parity", *args, "--max-tokens", "16",
         "--enforce-eager"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_passes_on_the_plugin(checkpoint, tmp_path):
    done = run_parity(str(checkpoint("tiny-21b")), "--json", str(tmp_path / "v.json"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "verdict: PASS" in done.stdout
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["agreement"] == 1.0 and verdict["max_drift"] < 1e-3


def test_flags_a_corrupted_expert(checkpoint, tmp_path):
    original = checkpoint("tiny-21b")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(original, corrupted)
    tensors = load_file(str(corrupted / "model.safetensors"))
    for expert in range(4):
        tensors[f"model.layers.1.mlp.experts.{expert}.down_proj.weight"] *= 30
    save_file(tensors, str(corrupted / "model.safetensors"))
    done = run_parity(str(corrupted), "--reference", str(original))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "verdict: FAIL" in done.stdout
