"""Quantize a BF16 ERNIE-4.5 MoE ``-PT`` checkpoint to msModelSlim's format: W8A8_DYNAMIC, W8A16,
W4A8_DYNAMIC routed experts with W8A8_DYNAMIC elsewhere, or W4A16 (per-group int4, every linear).

    python -m vllm_ernie_moe.tools.quantize --model IN --output OUT
        [--format w8a16|w4a8-dynamic|w4a16 [--group-size 128]]
    (or: vllm-ernie-moe-quantize)

W8A8_DYNAMIC and W8A16 store the same int8 weights and scales (msModelSlim's per-channel symmetric
minmax); only the labels differ, which tell the server whether to quantize activations too.
W4A8_DYNAMIC experts get msModelSlim's "ssz" int4 scales, its packing and ``scale_bias``, as its
w4a8 practices write them. W4A16 gets msModelSlim v0's per-group MinMax int4 (fp32 arithmetic),
packed as W4A8, with fp32 scales and offsets per group, as its ascendV1 saver writes them.

The output loads in this plugin and, except W4A16 (vllm-ascend 182b75e has no msModelSlim W4A16
scheme for linear layers), in vllm-ascend (``ascend``), and holds the same int8 weights and
scales msModelSlim writes for the same input. It streams one tensor at a time, so peak memory is
about one output shard (``--shard-size-gb``), not the model; it writes into a temporary sibling
directory and renames it only when complete, so an interrupted run (full disk, Ctrl-C) never leaves
an output that looks finished. Never quantized: router, correction bias, norms, embeddings, lm_head.
"""

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_ernie_moe.layout import (
    is_mtp_tensor_name,
    is_paddle_tensor_name,
    is_quantizable_weight,
    is_routed_expert,
)
from vllm_ernie_moe.quant.msmodelslim import (
    DESCRIPTION_FILE,
    FLOAT,
    W4A8_DYNAMIC,
    W4A16,
    W4A16_GROUP_SIZES,
    W8A8_DYNAMIC,
    W8A16,
    int4_scale_bias,
    is_fused_expert_tensor,
    pack_int4_rows,
    quantize_int4_groups,
    quantize_int4_rows_ssz,
    quantize_rows,
    scale_bias_groups,
    scale_bias_name,
)

WEIGHTS_PREFIX = "quant_model_weights"
INDEX = f"{WEIGHTS_PREFIX}.safetensors.index.json"
# What msModelSlim's saver copies besides the weights (tokenizer, generation and chat files).
COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja", ".model", ".tiktoken")
NOT_COPIED = ("model.safetensors.index.json", "config.json")
#: ``--format`` values and the label each writes.
FORMATS = {
    "w8a8-dynamic": W8A8_DYNAMIC,
    "w8a16": W8A16,
    "w4a8-dynamic": W4A8_DYNAMIC,
    "w4a16": W4A16,
}


class QuantizeError(Exception):
    """Input the tool refuses; the message says what to do."""


def ties_word_embeddings(config: dict) -> bool:
    """Whether the model ties its lm_head, resolved as transformers and vLLM do: a config.json
    without the key gets ``Ernie4_5_MoeConfig``'s default (tied)."""
    from transformers import Ernie4_5_MoeConfig

    return bool(Ernie4_5_MoeConfig.from_dict(config).tie_word_embeddings)


def _source_tensors(model_dir: Path) -> list[tuple[Path, str]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"{model_dir}: no *.safetensors files (a -PT checkpoint directory?)")
    tensors = []
    for path in files:
        with safe_open(str(path), "pt") as f:
            tensors.extend((path, name) for name in f.keys())
    return tensors


def _check_source(model_dir: Path, tensors: list[tuple[Path, str]]) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise QuantizeError(
            f"{model_dir}/config.json has a quantization_config: the input must be BF16/FP16/FP32."
        )
    for path, name in tensors:
        if is_paddle_tensor_name(name):
            raise QuantizeError(
                f"{path}: tensor '{name}' is in the ERNIE -Paddle layout; "
                "quantize the -PT checkpoint."
            )
        if is_fused_expert_tensor(name):
            raise QuantizeError(
                f"{path}: tensor '{name}' is a fused 3-D expert tensor (transformers 5 in-memory "
                "layout); the -PT format stores experts one by one."
            )


def _read(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def converted(
    name: str, tensor: torch.Tensor, label: str, group_size: int = 0
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """The output tensors for one input tensor, with their labels: W4A8_DYNAMIC applies to the
    routed experts, the other quantized linears get W8A8_DYNAMIC (msModelSlim's w4a8 practice);
    W4A16 applies to every quantized linear, per group of ``group_size`` inputs."""
    if not (is_quantizable_weight(name) and tensor.dim() == 2 and tensor.is_floating_point()):
        yield name, tensor, FLOAT
        return
    if label == W4A16:
        if tensor.shape[1] % group_size or tensor.shape[0] % 2:
            raise QuantizeError(
                f"tensor '{name}' of shape {list(tensor.shape)}: W4A16 needs inputs in whole "
                f"groups of --group-size {group_size} and an even number of rows (two int4 per "
                "byte): choose a group size that divides the inputs."
            )
        values, scale = quantize_int4_groups(tensor, group_size)
        yield name, pack_int4_rows(values), label
    elif label == W4A8_DYNAMIC and is_routed_expert(name):
        values, scale = quantize_int4_rows_ssz(tensor)
        yield name, pack_int4_rows(values), label
        yield scale_bias_name(name), int4_scale_bias(values, scale, scale_bias_groups(name)), label
    else:
        label = W8A8_DYNAMIC if label == W4A8_DYNAMIC else label
        quantized, scale = quantize_rows(tensor)
        yield name, quantized, label
    yield f"{name}_scale", scale, label
    yield f"{name}_offset", torch.zeros_like(scale), label


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``). The shard's tensors are
    a few MB each, below glibc's mmap threshold: without this, fragments of every written shard
    stay resident (measured: resident memory after each shard grew by ~0.7 GiB, to a 15.6 GiB
    peak for the 28-layer 21B; with it, it falls back to under 1 GiB after each shard)."""
    if (libc := _libc()) is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """The C library, looked up once (``find_library`` runs ``ldconfig``); None if not found."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


class ShardWriter:
    """Writes tensors into size-capped safetensors shards, renamed to k-of-N at the end."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, str(self.out_dir / f"shard-{len(self.shards)}.tmp"))
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        _release_freed_memory()

    def finish(self) -> None:
        self.flush()
        count = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"{WEIGHTS_PREFIX}-{k + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"shard-{k}.tmp").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))


def write_description(
    out_dir: Path, labels: dict[str, str], label: str, group_size: int = 0
) -> None:
    """msModelSlim's description JSON: every tensor's label and the model's type."""
    description = dict(
        labels,
        version="1.0.0",
        # msModelSlim names the highest type but hides W4A8_DYNAMIC behind W8A8_DYNAMIC.
        model_quant_type=W8A8_DYNAMIC if label == W4A8_DYNAMIC else label,
        metadata={},
        group_size=group_size,
        optional={},
    )
    (out_dir / DESCRIPTION_FILE).write_text(json.dumps(description, indent=4))


def quantize_checkpoint(
    model_dir: Path,
    output_dir: Path,
    shard_size_gb: float = 2.0,
    label: str = W8A8_DYNAMIC,
    group_size: int = W4A16_GROUP_SIZES[-1],
) -> Path:
    """Write the ``label`` (a :data:`FORMATS` value) checkpoint of ``model_dir`` to
    ``output_dir`` (W4A16 per ``group_size`` inputs); returns it."""
    if label == W4A16 and group_size not in W4A16_GROUP_SIZES:
        raise QuantizeError(
            f"group size {group_size}: W4A16 is served with groups of "
            f"{', '.join(map(str, W4A16_GROUP_SIZES))} inputs."
        )
    group_size = group_size if label == W4A16 else 0
    from tqdm import tqdm

    model_dir, output_dir = model_dir.resolve(), output_dir.resolve()
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir}: no config.json; pass a checkpoint directory to --model")
    if (
        output_dir == model_dir
        or model_dir in output_dir.parents
        or output_dir in model_dir.parents
    ):
        raise QuantizeError(
            f"--output {output_dir} overlaps the input {model_dir}: choose a separate directory."
        )
    if output_dir.exists():
        raise QuantizeError(f"--output {output_dir} exists: remove it or choose another path.")
    tensors = _source_tensors(model_dir)
    _check_source(model_dir, tensors)
    config = json.loads((model_dir / "config.json").read_text())

    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        writer = ShardWriter(partial, int(shard_size_gb * 2**30))
        labels: dict[str, str] = {}
        for path, name in tqdm(tensors, desc="quantizing", unit="tensor"):
            if is_mtp_tensor_name(name):
                # Kept as it is, for MTP speculative decoding (msModelSlim drops the head).
                writer.add(name, _read(path, name))
                labels[name] = FLOAT
                continue
            for out_name, tensor, out_label in converted(
                name, _read(path, name), label, group_size
            ):
                writer.add(out_name, tensor)
                labels[out_name] = out_label
        if ties_word_embeddings(config) and "lm_head.weight" not in labels:
            # msModelSlim writes the tied head explicitly; vllm-ascend expects it.
            embedding = next(p for p, n in tensors if n == "model.embed_tokens.weight")
            writer.add("lm_head.weight", _read(embedding, "model.embed_tokens.weight"))
            labels["lm_head.weight"] = FLOAT
        writer.finish()
        write_description(partial, labels, label, group_size)
        config.pop("quantization_config", None)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix in COPIED_SUFFIXES and item.name not in NOT_COPIED:
                shutil.copy2(item, partial / item.name)
        partial.rename(output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vllm-ernie-moe-quantize",
        description="Quantize an ERNIE-4.5 MoE -PT checkpoint to msModelSlim W8A8_DYNAMIC, W8A16, "
        "W4A8_DYNAMIC or W4A16.",
    )
    parser.add_argument("--model", required=True, type=Path, help="input checkpoint directory")
    parser.add_argument("--output", required=True, type=Path, help="new output directory")
    parser.add_argument(
        "--shard-size-gb", type=float, default=2.0, help="max size of one weight file (GiB)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="w8a8-dynamic",
        help="w8a8-dynamic: int8 weights and per-token int8 activations; w8a16: int8 weights "
        "only; w4a8-dynamic: int4 routed experts, w8a8-dynamic elsewhere; w4a16: int4 weights "
        "per group of inputs, every linear",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=W4A16_GROUP_SIZES,
        default=W4A16_GROUP_SIZES[-1],
        help="inputs per W4A16 scale (msModelSlim's W4A16 recipes use 128); w4a16 only",
    )
    args = parser.parse_args(argv)
    if not args.model.is_dir():
        parser.error(f"--model {args.model} is not a directory")
    if args.shard_size_gb <= 0:
        parser.error("--shard-size-gb must be positive")
    try:
        out = quantize_checkpoint(
            args.model, args.output, args.shard_size_gb, FORMATS[args.format], args.group_size
        )
    except (QuantizeError, OSError) as error:
        sys.exit(f"vllm-ernie-moe-quantize: {error}")
    print(f"wrote {out} (serve it with: vllm serve {out})")


if __name__ == "__main__":
    main()
