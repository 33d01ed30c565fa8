"""Bad checkpoints fail with the tensor, the file and the fix named."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Ernie4_5_MoeConfig

from vllm_ernie_moe.checkpoint import CheckpointError, CheckpointValidator


def load(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def config_of(path, **changes):
    return Ernie4_5_MoeConfig(**dict(json.loads((path / "config.json").read_text()), **changes))


def validate(config, tensors, model_dir=None):
    validator = CheckpointValidator(config, model_dir)
    loaded = dict(validator.check(tensors.items()))
    validator.check_complete()
    return loaded


def test_valid_checkpoint_passes_with_canonical_bias(checkpoint):
    path = checkpoint("tiny-21b")
    loaded = validate(config_of(path), load(path), path)
    bias = loaded["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (8,)


def test_transformers_bias_spelling_and_mtp_tensors_are_accepted(checkpoint):
    path = checkpoint("tiny-21b")
    tensors = load(path)
    tensors["model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"] = tensors.pop(
        "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    )
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    loaded = validate(config_of(path), tensors)
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in loaded
    assert not any("mtp" in name for name in loaded)


def test_paddle_layout_is_rejected(checkpoint):
    path = checkpoint("tiny-21b")
    paddle = {"ernie.layers.0.self_attn.qkv_proj.weight": torch.zeros(64, 128)}
    with pytest.raises(CheckpointError, match=r"-Paddle layout.*ERNIE-4.5-21B-A3B-PT"):
        validate(config_of(path), paddle)


def test_shared_experts_missing_against_config(checkpoint):
    path = checkpoint("tiny-300b")  # has no shared experts
    with pytest.raises(CheckpointError, match=r"shared_experts.*moe_num_shared_experts=2"):
        validate(config_of(path, moe_num_shared_experts=2), load(path), path)


def test_shared_experts_present_against_config(checkpoint):
    path = checkpoint("tiny-21b")  # has shared experts
    with pytest.raises(
        CheckpointError,
        match=r"safetensors: tensor 'model.layers.1.mlp.shared_experts.*moe_num_shared_experts=0",
    ):
        validate(config_of(path, moe_num_shared_experts=0), load(path), path)


def test_missing_tensor_is_named(checkpoint):
    path = checkpoint("tiny-21b")
    tensors = load(path)
    del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    with pytest.raises(
        CheckpointError,
        match=r"1 required tensors are missing: model.layers.2.mlp.experts.5.down_proj.weight",
    ):
        validate(config_of(path), tensors, path)


def test_misshaped_tensor_is_named(checkpoint):
    path = checkpoint("tiny-300b")
    tensors = load(path)
    tensors["model.layers.3.mlp.experts.1.up_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(
        CheckpointError,
        match=r"experts.1.up_proj.weight' has shape \[16, 64\], but config.json implies \[32, 64\]",
    ):
        validate(config_of(path), tensors, path)


def test_engine_reports_the_checkpoint_error(checkpoint, tmp_path):
    """Through the real engine: the user sees the CheckpointError text, naming file and tensor."""
    source = checkpoint("tiny-21b")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    tensors = load(source)
    del tensors["model.layers.1.mlp.shared_experts.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    script = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM(model={str(broken)!r}, dtype='float32', max_model_len=256, enforce_eager=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    assert "required tensors are missing: model.layers.1.mlp.shared_experts.up_proj.weight" in (
        done.stdout + done.stderr
    )
