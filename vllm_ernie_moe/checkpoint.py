"""What an ERNIE-4.5-MoE ``-PT`` checkpoint must contain, and clear errors when it does not.

The model's ``load_weights`` streams every tensor through :class:`CheckpointValidator` before vLLM's
weight loaders see it, so that a wrong checkpoint fails with the tensor, the file and the fix named,
instead of an assertion deep inside a weight loader or, worse, a silently wrong model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import torch
from transformers import PretrainedConfig

from vllm_ernie_moe.layout import (
    CORRECTION_BIAS,
    CORRECTION_BIAS_TRANSFORMERS,
    expected_tensor_shapes,
    is_mtp_tensor_name,
    is_paddle_tensor_name,
    is_quantizable_weight,
)
from vllm_ernie_moe.quant.msmodelslim import (
    INT4_PACKED_LABELS,
    INT8_WEIGHT_LABELS,
    W4A8_DYNAMIC,
    W4A16,
    ModelSlimDescription,
    scale_bias_groups,
    scale_bias_name,
)

PT_REPOS = "baidu/ERNIE-4.5-21B-A3B-PT or baidu/ERNIE-4.5-300B-A47B-PT"


class CheckpointError(ValueError):
    """The checkpoint does not match what the config and the ERNIE-4.5-MoE -PT format say."""


def _canonical_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The correction bias is stored [1, E]; FusedMoE takes [E]."""
    return tensor.reshape(-1) if name.endswith(CORRECTION_BIAS) else tensor


class TensorLocator:
    """Finds which safetensors file of a local checkpoint directory holds a tensor."""

    def __init__(self, model_dir: str | os.PathLike | None):
        self.model_dir = Path(model_dir) if model_dir and os.path.isdir(model_dir) else None

    @cached_property
    def _file_of(self) -> dict[str, str]:
        if self.model_dir is None:
            return {}
        located: dict[str, str] = {}
        for index in sorted(self.model_dir.glob("*.safetensors.index.json")):
            located.update(json.loads(index.read_text()).get("weight_map", {}))
        if located:
            return located
        from safetensors import safe_open

        for path in sorted(self.model_dir.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                located.update(dict.fromkeys(f.keys(), path.name))
        return located

    def where(self, name: str) -> str:
        """A human-readable location: ``'<dir>/<file>'`` or just the directory."""
        where = self.model_dir or "the checkpoint"
        file = self._file_of.get(name)
        return f"{where}/{file}" if file else str(where)


def add_quantized_tensors(
    shapes: dict[str, tuple[int, ...]], description: ModelSlimDescription
) -> dict[str, tuple[int, ...]]:
    """Add the scale and offset [out, 1] of every quantized linear weight ([out, in / group_size]
    for W4A16); int4 weights are packed [out/2, in], and W4A8_DYNAMIC has a ``scale_bias``
    ([out, 16] for row-parallel projections)."""
    quantized = dict(shapes)
    for name, shape in shapes.items():
        if not is_quantizable_weight(name):
            continue
        label = description.label(name)
        if label not in INT8_WEIGHT_LABELS:
            continue
        out, columns = shape
        scales = columns // description.group_size if label == W4A16 else 1
        quantized[f"{name}_scale"] = (out, scales)
        quantized[f"{name}_offset"] = (out, scales)
        if label in INT4_PACKED_LABELS:
            quantized[name] = (out // 2, columns)
        if label == W4A8_DYNAMIC:
            quantized[scale_bias_name(name)] = (out, scale_bias_groups(name))
    return quantized


class CheckpointValidator:
    """Checks names, shapes and dtypes of a stream of ``(name, tensor)`` against the config and,
    for msModelSlim checkpoints, against the description JSON."""

    def __init__(
        self,
        config: PretrainedConfig,
        model_dir: str | os.PathLike | None,
        description: ModelSlimDescription | None = None,
        strict: bool = True,
        not_loaded: tuple[str, ...] = (),
    ):
        """``strict=False`` (a quantization method of another plugin, e.g. vllm-ascend's) only
        rejects -Paddle layouts and canonicalises names: that method owns the tensor layout.
        Tensors under the ``not_loaded`` prefixes are served by the repack cache, whose key holds
        the safetensors headers the start that made the entry checked: they count as present
        and, should they arrive, are dropped unread."""
        self.config = config
        self.not_loaded = not_loaded
        self.description = description
        self.strict = strict
        self.expected = expected_tensor_shapes(config)
        if description is not None:
            self.expected = add_quantized_tensors(self.expected, description)
        self.locator = TensorLocator(model_dir)
        self.seen: set[str] = set()
        self.arrived: set[str] = set()

    def _fail(self, name: str, problem: str, fix: str) -> CheckpointError:
        return CheckpointError(f"{self.locator.where(name)}: tensor '{name}' {problem}. {fix}")

    def _shared_experts_hint(self) -> str:
        shared = getattr(self.config, "moe_num_shared_experts", 0)
        return (
            f"config.json gives moe_num_shared_experts={shared} (transformers' default is 2 when "
            "the key is absent; ERNIE-4.5-300B-A47B has 0). Set it to match the weights."
        )

    def check(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors the model loads in canonical name and shape; skip MTP tensors.

        Raises :class:`CheckpointError` on a ``-Paddle`` layout, an unexpected or mis-shaped tensor.
        """
        for name, tensor in weights:
            self.arrived.add(name)
            if is_paddle_tensor_name(name):
                raise self._fail(
                    name,
                    "is in the ERNIE -Paddle layout (prefix 'ernie.', fused qkv/up_gate, "
                    "weights stored [in, out])",
                    f"This plugin serves the PyTorch (-PT) checkpoints: use {PT_REPOS}.",
                )
            if is_mtp_tensor_name(name):
                continue
            canonical = name.replace(CORRECTION_BIAS_TRANSFORMERS, CORRECTION_BIAS)
            if canonical == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # a tied checkpoint may still carry a copy (msModelSlim writes one)
            if canonical.startswith(self.not_loaded):
                continue
            if not self.strict:
                yield canonical, _canonical_bias(canonical, tensor)
                continue
            shape = self.expected.get(canonical)
            if shape is None:
                hint = (
                    self._shared_experts_hint()
                    if ".shared_experts." in canonical
                    else "Check that config.json belongs to these weights."
                )
                raise self._fail(name, "is not part of the model that config.json describes", hint)
            got = tuple(tensor.shape)
            # [1, E] bias and [out, 1] scales may also be stored flat.
            flat_ok = canonical.endswith((CORRECTION_BIAS, "_scale", "_offset")) and got == (
                shape[0] * shape[1],
            )
            if got != shape and not flat_ok:
                raise self._fail(
                    name,
                    f"has shape {list(got)}, but config.json implies {list(shape)}",
                    "Check that config.json belongs to these weights.",
                )
            self.seen.add(canonical)
            if self.description is not None:
                self._check_quantized(name, canonical, tensor)
                if canonical.endswith((".weight_offset", ".scale_bias")):
                    continue  # zeros (checked) / the NPU kernel's precomputed sums: not needed
            if canonical.endswith("_scale"):
                tensor = tensor.reshape(shape)
            yield canonical, _canonical_bias(canonical, tensor)

    def _check_quantized(self, name: str, canonical: str, tensor: torch.Tensor) -> None:
        assert self.description is not None
        if canonical.endswith(".weight_offset"):
            if torch.count_nonzero(tensor):
                raise self._fail(
                    name,
                    "is non-zero (asymmetric weight quantization)",
                    "Only symmetric int8 / int4 weights are served: re-quantize with symmetric "
                    "weights.",
                )
            return
        if not is_quantizable_weight(canonical):
            return
        label = self.description.label(name)
        if (label in INT8_WEIGHT_LABELS) != (tensor.dtype == torch.int8):
            raise self._fail(
                name,
                f"is {tensor.dtype} but labelled {label} in {self.description.path.name}",
                "The description and the weights disagree: re-export the checkpoint.",
            )

    def _served(self, names: Iterable[str]) -> set[str]:
        return {name for name in names if name.startswith(self.not_loaded)}

    def check_complete(self) -> None:
        """Raise if tensors the config (or the description) requires never arrived."""
        if not self.strict:
            return
        missing = sorted(set(self.expected) - self.seen - self._served(self.expected))
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            hint = (
                self._shared_experts_hint()
                if any(".shared_experts." in name for name in missing)
                else "The checkpoint is incomplete or does not match config.json."
            )
            where = self.locator.model_dir or "the checkpoint"
            raise CheckpointError(
                f"{where}: {len(missing)} required tensors are missing: {shown}. {hint}"
            )
        labels = set(self.description.labels) if self.description else set()
        absent = sorted(labels - self.arrived - self._served(labels))
        if absent:
            raise CheckpointError(
                f"{self.description.path}: names {len(absent)} tensors that are not in the "
                f"weight files, e.g. {', '.join(absent[:3])}. Re-export the checkpoint."
            )
