# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
# Upstream location: tests/models/test_ernie_mtp.py (CPU, one process, no engine).
"""ErnieMTP must follow Baidu's MTP forward (FastDeploy ernie4_5_mtp.py): ERNIE's interleaved
rotary in the MTP block, no masking of position 0, and the main model's final norm
(model.norm.weight) applied to the block's output before the shared lm_head."""

import json
import tempfile

import pytest
import torch
from torch import nn
from transformers import Ernie4_5_MoeConfig
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.models.ernie_mtp import ErnieMTP

HIDDEN = 16


@pytest.fixture(scope="module")
def mtp(tmp_path_factory):
    config = Ernie4_5_MoeConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=8,
        moe_layer_start_index=1,
        num_nextn_predict_layers=1,
        architectures=["Ernie4_5_MoeForCausalLM"],
    )
    path = tmp_path_factory.mktemp("ernie")
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    vllm_config = VllmConfig(model_config=ModelConfig(model=str(path), dtype="float32"))
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{tempfile.mktemp()}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        model = ErnieMTP(vllm_config=vllm_config)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator))
    return model


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class BlockStub(nn.Module):
    """Stands in for the decoder block: output 2x, residual x (so the block adds up to 3x)."""

    def forward(self, positions, hidden_states, residual):
        return 2 * hidden_states, hidden_states


def test_mtp_block_rotates_interleaved(mtp):
    (layer,) = mtp.model.layers.values()
    assert layer.mtp_block.self_attn.rotary_emb.is_neox_style is False


def test_every_position_used_and_final_norm_applied(mtp):
    (layer,) = mtp.model.layers.values()
    layer.mtp_block = BlockStub()
    eps = mtp.config.rms_norm_eps
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, HIDDEN, generator=generator)
    previous = torch.randn(3, HIDDEN, generator=generator)
    positions = torch.tensor([0, 1, 2])
    with torch.no_grad():
        got = mtp.model(None, positions, previous, inputs_embeds=embeds.clone())
        joined = torch.cat(
            [
                rms(embeds, layer.mtp_emb_norm.weight, eps),
                rms(previous, layer.mtp_hidden_norm.weight, eps),
            ],
            dim=-1,
        )
        projected = joined @ layer.mtp_linear_proj.weight.T
        want = rms(3 * projected, mtp.model.norm.weight, eps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_shared_final_norm_is_loaded(mtp):
    weight = torch.full((HIDDEN,), 0.5)
    loaded = mtp.load_weights([("model.norm.weight", weight)])
    assert "model.norm.weight" in loaded
    assert torch.equal(mtp.model.norm.weight.data, weight)
