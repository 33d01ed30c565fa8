"""msModelSlim's int8 formats and math: shared by the loader, online and offline quantizing.

Format (see docs/w8a8.md): a description JSON maps every tensor name to a label; a W8A8_DYNAMIC or
W8A16 linear ``P`` stores ``P.weight`` int8 [out, in], ``P.weight_scale`` [out, 1] and
``P.weight_offset`` [out, 1] (all zeros: symmetric). Math: per output channel
``s_w = max|W_row| / 127`` and ``q = clamp(round(W / s_w), -128, 127)``, computed in the weight's
own dtype as msModelSlim does. W8A8_DYNAMIC also quantizes activations per token at run time; W8A16
leaves them in the model dtype. W4A8_DYNAMIC (routed experts) stores int4 weights two per int8
along the output dimension (``P.weight`` [out/2, in]: row ``2j`` in the low nibble of packed row
``j``, row ``2j + 1`` in the high one), its scale and offset [out, 1], and ``P.scale_bias``
(``8 * sum`` of the dequantized row, for the NPU kernel's unsigned int4 trick; [out, 1], or
[out, 16] partial sums for the row-parallel down_proj/o_proj); activations as W8A8_DYNAMIC.
W4A16 (msModelSlim v0's per-group int4, any linear) packs as W4A8_DYNAMIC, with ``weight_scale``
and ``weight_offset`` per group of ``group_size`` inputs ([out, in / group_size], fp32);
activations stay in the model dtype. Math: ``s = max|W_group| / 7``,
``q = clamp(round(W / s), -8, 7)`` in fp32.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_ernie_moe.layout import (
    EXPERTS,
    FUSED_EXPERT_TENSORS,
    ROW_PARALLEL_PROJECTIONS,
    fused_module_of,
    is_quantizable_weight,
    is_routed_expert,
)

#: This plugin's vLLM quantization method name (distinct from vllm-ascend's "ascend").
QUANTIZATION_NAME = "ernie-w8a8-dynamic"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W8A16 = "W8A16"
W4A8_DYNAMIC = "W4A8_DYNAMIC"
W4A16 = "W4A16"
FLOAT = "FLOAT"
#: Labels whose weights are stored as int8 tensors with a scale and a zero offset.
INT8_WEIGHT_LABELS = (W8A8_DYNAMIC, W8A16, W4A8_DYNAMIC, W4A16)
#: Labels whose int8 tensors hold two int4 values each, along the output rows.
INT4_PACKED_LABELS = (W4A8_DYNAMIC, W4A16)
#: W4A16 group sizes both int4 kernels take (vLLM's experts: 128/64/32; PyTorch's linear: +256).
W4A16_GROUP_SIZES = (32, 64, 128)
SUPPORTED_LABELS = (*INT8_WEIGHT_LABELS, FLOAT)
#: Column groups of a W4A8_DYNAMIC row-parallel ``scale_bias`` (msModelSlim's fixed ``tp_num``).
SCALE_BIAS_GROUPS = 16
#: The description msModelSlim's v1 CLI and v0 ascendV1 writers save, the only name vllm-ascend
#: detects (and the one the offline tool writes).
DESCRIPTION_FILE = "quant_model_description.json"
#: The names this plugin reads: then that of msModelSlim v0's safe_tensor writer.
DESCRIPTION_FILES = (DESCRIPTION_FILE, "quant_model_description_w8a8_dynamic.json")
METADATA_KEYS = frozenset(
    {
        "version",
        "model_quant_type",
        "group_size",
        "metadata",
        "optional",
        "kv_cache_type",
        "kv_quant_type",
        "fa_quant_type",
        "reduce_quant_type",
    }
)


class QuantizationFormatError(ValueError):
    """A quantized checkpoint this plugin cannot serve correctly; the message names the fix."""


QUANTIZED_SUFFIXES = (".weight", ".weight_scale", ".weight_offset", ".scale_bias")


def _module_of(tensor: str) -> str:
    """``P.weight`` / ``P.weight_scale`` / ``P.weight_offset`` / ``P.scale_bias`` -> ``P``."""
    return next((tensor[: -len(s)] for s in QUANTIZED_SUFFIXES if tensor.endswith(s)), tensor)


def is_fused_expert_tensor(name: str) -> bool:
    """``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``: all experts in one 3-D tensor
    (transformers 5's in-memory layout), not the -PT per-expert layout."""
    parts = _module_of(name).split(".")
    return len(parts) >= 2 and parts[-2] == EXPERTS and parts[-1] in FUSED_EXPERT_TENSORS


def _check_quantizable(path: Path, tensor: str, label: str) -> None:
    if is_fused_expert_tensor(tensor):
        raise QuantizationFormatError(
            f"{path}: tensor '{tensor}' is a fused 3-D expert tensor (transformers 5 layout); "
            "msModelSlim must see per-expert linears: export with transformers<5."
        )
    module = _module_of(tensor)
    if not is_quantizable_weight(module + ".weight"):
        what = "the MoE router" if module.endswith("mlp.gate") else "this tensor"
        raise QuantizationFormatError(
            f"{path}: tensor '{tensor}' is labelled {label}, but {what} must stay FLOAT "
            "(ERNIE routes in fp32; embeddings, lm_head and norms are not quantized). "
            "Re-quantize with the router and lm_head excluded (exclude: ['*mlp.gate', 'lm_head'])."
        )


def check_fused_labels(path: Path, labels: dict[str, str]) -> None:
    """One label per fused vLLM module: its tensors run as one GEMM (vllm-ascend even reads only
    expert 0's label for all experts of a layer)."""
    groups: dict[str, dict[str, str]] = {}
    for tensor, label in labels.items():
        module = fused_module_of(tensor)
        if module is not None:
            groups.setdefault(module, {}).setdefault(label, tensor)
    for module, tensor_of_label in groups.items():
        if len(tensor_of_label) > 1:
            shown = ", ".join(f"{tensor}: {label}" for label, tensor in tensor_of_label.items())
            raise QuantizationFormatError(
                f"{path}: the tensors of vLLM's fused module '{module}' have different labels "
                f"({shown}); they run as one GEMM: label them alike and re-export."
            )


def read_labels(path: Path) -> dict[str, str]:
    """The per-tensor labels of a description JSON (its metadata keys left out)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in METADATA_KEYS}


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """msModelSlim's W4A8 packing undone: ``[..., out/2, in]`` int8 -> ``[..., out, in]`` int8
    holding int4 values (-8..7); row ``2j`` is packed row ``j``'s low nibble, ``2j + 1`` its
    high one."""
    low = torch.bitwise_left_shift(packed, 4) >> 4  # arithmetic shifts keep the sign
    high = packed >> 4
    rows = torch.stack([low, high], dim=-2)  # [..., out/2, 2, in]
    return rows.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def dequantized_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An int8 weight, or int4 pairs (``[out/2, in]`` against ``out`` scale rows), times its
    per-channel or per-group scale: fp32 ``[out, in]``."""
    scale = scale.float().reshape(scale.shape[0], -1)  # a per-channel scale may be stored flat
    values = unpack_int4_rows(weight) if 2 * weight.shape[0] == scale.shape[0] else weight
    return values.float() * scale.repeat_interleave(values.shape[1] // scale.shape[1], dim=1)


#: msModelSlim's "ssz" scale search: at most this many least-squares refinements per weight.
SSZ_ITERATIONS = 50
SSZ_CONVERGED = 1e-10


def quantize_int4_rows_ssz(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int4 of ``weight [out, in]`` by msModelSlim's "ssz" search, bit for bit.

    Start from the min/max scale (``max|row| / 7``); then repeatedly refit each row's scale by least
    squares to the current int4 values (``sum(w q) / sum(q q)``), re-quantize, and keep a row's new
    scale where its mean squared error (fp32) dropped; stop when no row changes. The arithmetic
    stays in the weight's dtype, as msModelSlim's. Returns int8 holding -8..7 and the fp32 scale
    ``[out, 1]``.
    """
    rows = weight.T  # msModelSlim works on [in, out], one column per output row
    zero = torch.zeros(1, dtype=weight.dtype)
    peak = torch.max(-torch.min(rows.amin(0), zero), torch.max(rows.amax(0), zero))
    floor = torch.tensor([torch.finfo(torch.float32).eps]).type_as(peak)
    scale = torch.max(peak / 7.0, floor)

    def quantized(s: torch.Tensor) -> torch.Tensor:
        return (rows / s).round_().clamp_(-8, 7)

    def error(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.mean((rows - (q * s).float()).abs().pow(2), dim=0, keepdim=True)

    q = quantized(scale)
    best_scale, best_error = scale, error(q, scale)
    for _ in range(SSZ_ITERATIONS):
        fitted = torch.sum(rows * q, 0, keepdim=True) / torch.sum(q * q, 0, keepdim=True).clamp(
            min=1e-30
        )
        fitted = fitted.squeeze()
        q = quantized(fitted)
        current = error(q, fitted).squeeze()
        change = best_error - current
        settled = (change / best_error.clamp(min=1e-4) < SSZ_CONVERGED) | (
            change.abs() < SSZ_CONVERGED
        )
        if bool(settled.all()):
            break
        better = (current < best_error).to(torch.int32)
        best_error = best_error * (1 - better) + current * better
        best_scale = (best_scale * (1 - better) + fitted * better).squeeze()
    return quantized(best_scale).T.to(torch.int8), best_scale.float()[:, None]


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` holding -8..7 -> msModelSlim's packing ``[out/2, in]`` (inverse of
    :func:`unpack_int4_rows`)."""
    return torch.bitwise_left_shift(values[1::2], 4) | (values[0::2] & 0x0F)


def scale_bias_name(weight: str) -> str:
    """``P.weight`` -> ``P.scale_bias``."""
    return f"{weight.removesuffix('.weight')}.scale_bias"


def scale_bias_groups(weight: str) -> int:
    """Column groups of the W4A8_DYNAMIC ``scale_bias`` of ``P.weight``: :data:`SCALE_BIAS_GROUPS`
    for a row-parallel projection, 1 otherwise."""
    return SCALE_BIAS_GROUPS if weight.split(".")[-2] in ROW_PARALLEL_PROJECTIONS else 1


def int4_scale_bias(values: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """msModelSlim's ``scale_bias`` [out, groups]: 8 x the dequantized row sums over ``groups``
    column groups (fp32, in its order of operations)."""
    dequantized = (values.float().T * scale.reshape(-1)).T
    if groups == 1:
        return 8 * dequantized.sum(dim=1, keepdim=True)
    parts = dequantized.reshape(-1, dequantized.shape[1] // groups)
    return (8 * parts.sum(dim=1, keepdim=True)).reshape(dequantized.shape[0], -1)


def quantize_rows(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``weight [..., out, in]``, bit-identical to msModelSlim.

    The arithmetic stays in the weight's dtype (bf16 for bf16 checkpoints), as msModelSlim's.
    ``amax`` (``[..., out, 1]``) overrides the row maximum, for rows split across ranks.
    Returns the int8 weight and the fp32 scale ``[..., out, 1]``.
    """
    if amax is None:
        amax = weight.abs().amax(dim=-1, keepdim=True)
    scale = amax.to(weight.dtype) / 127
    # An all-zero row: any scale gives q = 0; use 1 to avoid 0 / 0.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    quantized = torch.clamp(torch.round(weight / scale), -128, 127).to(torch.int8)
    return quantized, scale.float()


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group int4 of ``weight [out, in]`` as msModelSlim v0's W4A16 MinMax, bit for
    bit (fp32 arithmetic): returns int8 holding -8..7 ``[out, in]`` and the fp32 scale
    ``[out, in / group_size]``."""
    out, inputs = weight.shape
    groups = weight.float().reshape(out, inputs // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: q = 0
    values = torch.clamp(torch.round(groups / scale), -8, 7).to(torch.int8)
    return values.reshape(out, inputs), scale.reshape(out, -1)


@dataclass
class ModelSlimDescription:
    """A parsed, validated description JSON: tensor labels plus metadata."""

    path: Path
    labels: dict[str, str]
    metadata: dict

    @property
    def group_size(self) -> int:
        """Inputs per W4A16 scale (0: per channel); :func:`load_description` checked it."""
        return parse_group_size(self.path, self.metadata)

    def label(self, tensor: str) -> str:
        try:
            return self.labels[tensor]
        except KeyError:
            raise QuantizationFormatError(
                f"{self.path}: no label for tensor '{tensor}'. The description must name every "
                "tensor of the checkpoint; re-export it with msModelSlim or "
                "`python -m vllm_ernie_moe.tools.quantize`."
            ) from None


def parse_group_size(path: Path, metadata: dict) -> int:
    """The description's ``group_size``: a whole number (msModelSlim writes an int; its docs show
    a string such as "128"), 0 when absent."""
    raw = metadata.get("group_size") or 0
    try:
        value = int(raw) if not isinstance(raw, float) else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise QuantizationFormatError(
            f"{path}: group_size={raw!r} is not a whole number of inputs; write it as an integer "
            "(0 for per-channel weights)."
        )
    return value


@dataclass(frozen=True)
class CheckpointRules:
    """What the model's checkpoint validator holds the tensors to under a quantization method."""

    #: The msModelSlim labels the int8 weights and scales are checked against.
    description: ModelSlimDescription | None = None
    #: Every tensor known and of the expected shape; off under another plugin's method (e.g.
    #: vllm-ascend's ``ascend``), which owns the quantized layout.
    strict: bool = True


def checkpoint_rules(quant_config, checkpoint_dir: str | os.PathLike) -> CheckpointRules:
    """The rules for a checkpoint served under ``quant_config`` (a vLLM ``QuantizationConfig``
    or None): its own ``checkpoint_rules()`` where it has one (``ernie-w8a8-dynamic``)."""
    if quant_config is None:
        return CheckpointRules()
    if hasattr(quant_config, "checkpoint_rules"):
        return quant_config.checkpoint_rules()
    if path := find_description(checkpoint_dir):
        # vllm-ascend reads one label per fused module (expert 0's for all experts): a file whose
        # labels disagree would load quietly half-wrong.
        check_fused_labels(path, read_labels(path))
    return CheckpointRules(strict=False)


def find_description(model_dir: str | os.PathLike) -> Path | None:
    """The description JSON of a local msModelSlim checkpoint directory, if it is one."""
    if not os.path.isdir(model_dir):
        return None
    for name in DESCRIPTION_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    return None


def load_description(path: Path) -> ModelSlimDescription:
    """Parse and validate: per-channel W8A8_DYNAMIC, W8A16, W4A8_DYNAMIC, per-group W4A16 and
    FLOAT, no quantized KV cache."""
    raw = json.loads(path.read_text())
    labels = read_labels(path)
    metadata = {k: v for k, v in raw.items() if k in METADATA_KEYS}
    group_size = parse_group_size(path, metadata)
    w4a16 = W4A16 in labels.values()
    if w4a16 and group_size not in W4A16_GROUP_SIZES:
        raise QuantizationFormatError(
            f"{path}: W4A16 with group_size={group_size}: only per-group W4A16 with a group of "
            f"{', '.join(map(str, W4A16_GROUP_SIZES))} inputs is served (the int4 CPU kernels' "
            "groups). Re-quantize with msModelSlim (is_lowbit=True, open_outlier=False, "
            "group_size=128) or `python -m vllm_ernie_moe.tools.quantize --format w4a16`."
        )
    if group_size > 0 and not w4a16:
        raise QuantizationFormatError(
            f"{path}: group_size={group_size} (per-group quantization) is only served for W4A16; "
            "the int8 and W4A8 weights here are per channel: quantize with group_size 0."
        )
    for key in ("kv_quant_type", "fa_quant_type", "kv_cache_type"):
        if metadata.get(key) not in (None, FLOAT, "", "None"):
            raise QuantizationFormatError(
                f"{path}: {key}={metadata[key]!r}: quantized KV cache / attention is not supported "
                "(the MindIE reference does not support it either); export without it."
            )
    for tensor, label in labels.items():
        if label not in SUPPORTED_LABELS:
            raise QuantizationFormatError(
                f"{path}: tensor '{tensor}' has label {label!r}; only W8A8_DYNAMIC (int8 "
                "per-channel weights, per-token dynamic activations), W8A16 (int8 per-channel "
                "weights only), W4A8_DYNAMIC (int4 per-channel weights, per-token dynamic "
                "activations), W4A16 (int4 per-group weights only) and FLOAT are supported. "
                "Re-quantize with msModelSlim's w8a8 dynamic, w8a16, w4a8 dynamic or w4a16 mode."
            )
        if label != FLOAT:
            _check_quantizable(path, tensor, label)
        if label == W4A8_DYNAMIC and not is_routed_expert(tensor):
            raise QuantizationFormatError(
                f"{path}: tensor '{tensor}' is labelled W4A8_DYNAMIC, which is served on the "
                "routed experts (mlp.experts.*) only, as in vllm-ascend; quantize the other "
                "linears W8A8_DYNAMIC, as msModelSlim's w4a8 practices do."
            )
    check_fused_labels(path, labels)
    return ModelSlimDescription(path, labels, metadata)
