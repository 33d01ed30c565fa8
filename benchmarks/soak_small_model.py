"""The soak under faults (``python -m vllm_ernie_moe.tools.soak``) on the shipped small model, with
a random LoRA adapter on its dense modules served next to it, 20000 requests or 10 minutes.

    make soak     # = python benchmarks/soak_small_model.py; result in docs/results/soak.json
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' PEFT adapter writer

from peft_adapter import DENSE_MODULES, write_adapter  # noqa: E402

from vllm_ernie_moe import soak  # noqa: E402
from vllm_ernie_moe.tools.small_model import SMALL_MODEL_DIR  # noqa: E402

if __name__ == "__main__":
    adapter = write_adapter(
        SMALL_MODEL_DIR, REPO / "benchmarks" / "out" / "soak-lora", DENSE_MODULES
    )
    sys.exit(soak.main([
        "--model", str(SMALL_MODEL_DIR), "--lora-adapter", str(adapter), "--requests", "20000",
        "--minutes", "10", "--json", str(REPO / "docs" / "results" / "soak.json"), *sys.argv[1:],
    ]))  # fmt: skip
