"""Which layers are MoE, and which tensors a checkpoint holds, against transformers itself."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Ernie4_5_MoeConfig
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
    Ernie4_5_MoeModel,
    Ernie4_5_MoeSparseMoeBlock,
)

from vllm_ernie_moe.layout import expected_tensor_shapes, moe_layer_ids

TINY = dict(
    hidden_size=8,
    intermediate_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    moe_num_experts=2,
    moe_k=1,
    moe_intermediate_size=4,
    vocab_size=16,
)


@pytest.mark.parametrize(
    "layers,start,end,interval",
    [
        (28, 1, 27, 1),  # ERNIE-4.5-21B-A3B
        (54, 3, 53, 1),  # ERNIE-4.5-300B-A47B
        (6, 1, -1, 1),  # -1: up to the last layer
        (8, 0, 6, 2),  # every second layer, stopping early
        (3, 5, 9, 1),  # start beyond the last layer: no MoE layer at all
    ],
)
def test_moe_layers_match_transformers(layers, start, end, interval):
    config = Ernie4_5_MoeConfig(
        num_hidden_layers=layers,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
        **TINY,
    )
    with torch.device("meta"):
        model = Ernie4_5_MoeModel(config)
    expected = [
        i
        for i, layer in enumerate(model.layers)
        if isinstance(layer.mlp, Ernie4_5_MoeSparseMoeBlock)
    ]
    raw = dict(config.to_dict(), moe_layer_end_index=end)  # as written in config.json
    assert moe_layer_ids(Ernie4_5_MoeConfig(**raw)) == expected


def test_no_experts_means_no_moe_layers():
    config = Ernie4_5_MoeConfig(num_hidden_layers=4, **dict(TINY, moe_num_experts=0))
    assert moe_layer_ids(config) == []


@pytest.mark.parametrize("geometry", ["tiny-21b", "tiny-300b"])
def test_expected_tensors_are_what_transformers_saves(checkpoint, geometry):
    path = checkpoint(geometry)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    config = Ernie4_5_MoeConfig(**json.loads((path / "config.json").read_text()))
    assert expected_tensor_shapes(config) == saved
