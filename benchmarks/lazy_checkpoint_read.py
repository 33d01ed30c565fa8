"""What a warm start pays to read a checkpoint tensor it will not use, and to key a repack by it.

The repack cache (``vllm_ernie_moe/quant/repack_cache.py``) keys each entry by the SHA-256 of the
loaded tensors, so a warm start reads the whole checkpoint (12.3 GiB at 28 layers) and hashes it,
then reads the entries that replace most of it (docs/notes/startup-breakdown.md). This measures,
on one tensor of ``--gib`` GiB with the page cache dropped before each case (needs root):

- vLLM's own safetensors iterator yielding the tensor, untouched (is the read lazy?);
- the same, then copied into a parameter as a weight loader does;
- SHA-256 of the tensor in memory as one call (the repack cache's key until it hashed in chunks),
  and the repack cache's key (``repack_cache._key``) with the process on one core, then on all.

With ``--checkpoint DIR`` (e.g. bench_engines.py's 28-layer W4A16 checkpoint), also the whole
checkpoint through the same iterator: every tensor untouched; every tensor but the routed experts
copied (a warm start once the repack cache serves the experts, when the model dropped them after
the iterator had mapped them); the same with the routed experts skipped before they are mapped
(``patches/patch_should_skip_weight.py``, as the model's load now asks).

    python benchmarks/lazy_checkpoint_read.py --json docs/results/lazy-checkpoint-read.json \
        [--checkpoint /work/bench/cache/21b-28layers-w4a16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_engines import machine
from safetensors.torch import save_file


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page faults on a mapping included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def iterate(
    paths: list[Path], copy: Callable[[str], bool], not_read: tuple[str, ...] = ()
) -> dict[str, float]:
    """Read the files through vLLM's iterator, copying the tensors ``copy`` names into new
    parameters, skipping those under ``not_read`` as the model's load asks; seconds, GiB read
    from storage and GiB copied."""
    from vllm.model_executor.model_loader import weight_utils

    from vllm_ernie_moe.patches import patch_should_skip_weight
    from vllm_ernie_moe.quant import repack_cache

    patch_should_skip_weight.apply()
    drop_page_cache()
    before, start, copied = disk_read_bytes(), time.perf_counter(), 0
    with repack_cache.not_reading(not_read):
        for name, tensor in weight_utils.safetensors_weights_iterator(list(map(str, paths)), False):
            if copy(name):
                copied += torch.empty_like(tensor).copy_(tensor).nbytes
    return {
        "seconds": round(time.perf_counter() - start, 3),
        "gib_read": round((disk_read_bytes() - before) / 2**30, 3),
        "gib_copied": round(copied / 2**30, 3),
    }


def checkpoint_cases(directory: Path) -> dict[str, dict[str, float]]:
    """The whole checkpoint in ``directory``: untouched, all but the routed experts copied, and
    the same with the routed experts never mapped."""
    from vllm_ernie_moe.layout import is_routed_expert

    paths = sorted(directory.glob("*.safetensors"))
    with open(directory / "config.json") as config:
        layers = json.load(config)["num_hidden_layers"]
    experts = tuple(f"model.layers.{layer}.mlp.experts." for layer in range(layers))
    return {
        "checkpoint_gib": round(sum(p.stat().st_size for p in paths) / 2**30, 3),
        "iterator_only": iterate(paths, lambda name: False),
        "all_but_routed_experts_copied": iterate(paths, lambda name: not is_routed_expert(name)),
        "routed_experts_not_mapped": iterate(paths, lambda name: True, not_read=experts),
    }


def sha256_seconds(data: torch.Tensor) -> float:
    """One SHA-256 over ``data``'s bytes, on one thread: the repack cache's key before it hashed
    in chunks."""
    start = time.perf_counter()
    hashlib.sha256(data.view(-1).view(torch.uint8).numpy()).digest()
    return round(time.perf_counter() - start, 3)


def repack_key_seconds(data: torch.Tensor, cores: set[int]) -> float:
    """The repack cache's key of ``data`` (``repack_cache._key``) with this process on ``cores``."""
    from vllm_ernie_moe.quant import repack_cache

    repack_cache._environment_digest()  # imports and reads sources once: not the key's cost
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        start = time.perf_counter()
        repack_cache._key("benchmark", [data])
        return round(time.perf_counter() - start, 3)
    finally:
        os.sched_setaffinity(0, allowed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="also measure this checkpoint directory")
    args = parser.parse_args()
    import safetensors
    import vllm

    cores = os.sched_getaffinity(0)
    data = torch.randint(-128, 127, (args.gib << 30,), dtype=torch.int8)
    with tempfile.TemporaryDirectory(dir=Path.home()) as directory:
        path = Path(directory) / "one-tensor.safetensors"
        save_file({"model.layers.1.mlp.experts.0.up_proj.weight": data}, path)
        result = {
            "machine": machine(None),
            "versions": {"vllm": vllm.__version__, "safetensors": safetensors.__version__},
            "tensor_gib": args.gib,
            # Hashing first: measured right after the page-cache cases, the two-core key was
            # 1.5-1.7x slower in trial runs (the cause was not looked into).
            "sha256_one_call_s": sha256_seconds(data),
            "repack_key_one_core_s": repack_key_seconds(data, {min(cores)}),
            f"repack_key_{len(cores)}_cores_s": repack_key_seconds(data, cores),
            "sha256_one_call_again_s": sha256_seconds(data),
            "iterator_only": iterate([path], lambda name: False),
            "iterator_then_copy": iterate([path], lambda name: True),
        }
    if args.checkpoint:
        result[f"checkpoint {args.checkpoint.name}"] = checkpoint_cases(args.checkpoint)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
