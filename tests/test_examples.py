"""The README's main job: the dialog example, on the embedded default checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

from settings import default_process_layout

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "run_pa.py"


def run_example(*args: str, cache: Path) -> subprocess.CompletedProcess:
    with default_process_layout():  # as users run it
        return subprocess.run(
            [sys.executable, str(EXAMPLE), *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, VLLM_ERNIE_MOE_CACHE_DIR=str(cache)),
            timeout=900,
        )


def test_dialog_on_default_checkpoint(tmp_path):
    done = run_example(
        "--input_texts", "What's Deep Learning?", "Hello", "--enforce_eager", cache=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained in minutes on Python's pydoc topics" in done.stdout
    answers = [line for line in done.stdout.splitlines() if line.startswith("Answer:")]
    assert len(answers) == 2
    # A trained model: mostly letters and spaces, words a newcomer can read.
    text = "".join(answers)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)
    # The plugin announces, once per vLLM process, that it replaced the built-in class.
    assert "now served by vllm_ernie_moe.model:Ernie4_5_MoeForCausalLM" in done.stdout + done.stderr


def test_bad_arguments_are_rejected_without_a_traceback(tmp_path):
    done = run_example("--max_output_length", "0", cache=tmp_path)
    assert done.returncode == 2
    assert "--max_output_length must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr
