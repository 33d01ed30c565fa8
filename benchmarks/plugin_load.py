"""What loading this plugin costs the API server: seconds of vLLM's general-plugin load (the
plugin's register, every patch's ``apply``) in a fresh process that has imported the API server's
modules first, as ``vllm serve`` has when it loads plugins.

Two variants, interleaved, each round in fresh processes: ``shipped`` (the plugin as installed)
and ``runner-imported`` (the same, then vLLM's CPU model runner imported: what
``patch_cpu_warmup_size`` made every process do before it waited for the runner's import).
``--drop-page-cache`` (root) empties the page cache before every process, as a first start after
a reboot finds it.

    python benchmarks/plugin_load.py --rounds 4 [--drop-page-cache] [--out FILE]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from vllm_ernie_moe.patches.patch_cpu_warmup_size import RUNNER_MODULE

CHILD = """
import importlib, sys, time
import vllm.entrypoints.openai.api_server
start = time.perf_counter()
from vllm.plugins import load_general_plugins
load_general_plugins()
if sys.argv[1] == "runner-imported":
    importlib.import_module(sys.argv[2])
print("RESULT", f"{time.perf_counter() - start:.3f}", sys.argv[2] in sys.modules)
"""


def measure(variant: str, drop_page_cache: bool) -> str:
    if drop_page_cache:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, variant, RUNNER_MODULE],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    seconds, imported = done.stdout.split("RESULT ")[-1].split()
    return f"{variant} {seconds} s, runner imported: {imported}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--drop-page-cache", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = []
    for round_ in range(1, args.rounds + 1):
        for variant in ("shipped", "runner-imported"):
            lines.append(f"round {round_}: {measure(variant, args.drop_page_cache)}")
            print(lines[-1], flush=True)
    if args.out:
        with args.out.open("a") as out:
            cache = "page cache dropped" if args.drop_page_cache else "page cache warm"
            out.write(f"# {' '.join(sys.argv)} ({cache})\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
