"""Hand-written PEFT LoRA adapters for test checkpoints, and their independent reference: the
adapter merged into transformers' weights, W + (alpha / r) * B @ A."""

import json
from pathlib import Path

import torch
from reference import load_tensors

#: Checkpoint modules a CPU adapter may target: attention, dense MLP, shared experts.
DENSE_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def is_routed_expert(module: str) -> bool:
    return ".mlp.experts." in module


def write_adapter(
    checkpoint: Path,
    out_dir: Path,
    modules: list[str],
    rank: int = 4,
    alpha: int = 8,
    seed: int = 0,
    routed_experts: bool = False,
) -> Path:
    """An adapter with random A [r, in] and B [out, r] for every checkpoint linear whose name
    ends in one of ``modules`` (routed experts only with ``routed_experts``)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in sorted(load_tensors(checkpoint).items()):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in modules or weight.dim() != 2:
            continue
        if is_routed_expert(module) and not routed_experts:
            continue
        out_features, in_features = weight.shape
        a = torch.randn(rank, in_features, generator=generator) * 0.1
        b = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        "bias": "none",
        "base_model_name_or_path": str(checkpoint),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def merged(adapter_dir: Path):
    """prepare(model) for ``transformers_greedy``: add the adapter's deltas to the weights."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_tensors(adapter_dir)

    def prepare(model) -> None:
        parameters = dict(model.named_parameters())
        for name, a in tensors.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[name.replace("lora_A", "lora_B")]
            weight = parameters[f"{module}.weight"]
            weight += (scale * b.double() @ a.double()).to(weight.dtype)

    return prepare
