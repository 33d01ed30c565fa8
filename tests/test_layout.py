"""The rules derived from the checkpoint layout (``vllm_ernie_moe.layout``) against the tables
they replace, written out by hand: vLLM's weight mapper, ``packed_modules_mapping``, the fused
module of a tensor, the label lookup and the LoRA targets."""

import pytest

from vllm_ernie_moe import layout


def test_weight_mapper_renames():
    assert layout.stacked_renames() == {
        ".q_proj": (".qkv_proj", "q"),
        ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"),
        ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
        ".mlp.up_proj": (".mlp.gate_up_proj", 1),
        ".shared_experts.gate_proj": (".shared_experts.gate_up_proj", 0),
        ".shared_experts.up_proj": (".shared_experts.gate_up_proj", 1),
    }
    assert layout.CORRECTION_BIAS_RENAME == {
        ".moe_statics.e_score_correction_bias": ".gate.e_score_correction_bias"
    }


def test_packed_modules_mapping():
    assert layout.packed_modules_mapping() == {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "experts": ["experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"],
    }


@pytest.mark.parametrize(
    "tensor, fused",
    [
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj"),
        ("model.layers.1.mlp.shared_experts.gate_proj.weight",
         "model.layers.1.mlp.shared_experts.gate_up_proj"),
        ("model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.experts"),
        ("model.layers.0.self_attn.o_proj.weight", None),
        ("model.layers.0.mlp.down_proj.weight", None),
        ("model.layers.1.mlp.gate.weight", None),
        ("model.layers.0.self_attn.q_proj.weight_scale", None),
    ],
)  # fmt: skip
def test_fused_module_of(tensor, fused):
    assert layout.fused_module_of(tensor) == fused


@pytest.mark.parametrize(
    "module, first",
    [
        ("model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.q_proj"),
        ("model.layers.1.mlp.shared_experts.gate_up_proj",
         "model.layers.1.mlp.shared_experts.gate_proj"),
        ("model.layers.1.mlp.experts", "model.layers.1.mlp.experts.0.gate_proj"),
        ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
    ],
)  # fmt: skip
def test_label_of_a_vllm_module_is_its_first_checkpoint_module(module, first):
    assert layout.first_checkpoint_module(module) == first


def test_cpu_lora_targets_are_the_dense_modules():
    assert sorted(layout.CPU_LORA_MODULES) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
