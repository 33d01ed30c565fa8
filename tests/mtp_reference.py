"""Baidu's reference MTP forward (FastDeploy ``ernie4_5_mtp.py``) written out in fp32 on
transformers' ERNIE decoder layer, and the drafts vLLM's speculative decoding asks of it."""

from pathlib import Path

import torch
from reference import load_tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_drafts(
    path: Path, sequence: list[int], final_norm: bool = True, zero_position_0: bool = False
) -> list[int]:
    """``drafts[p]``: the MTP head's greedy guess of ``sequence[p + 2]`` from the main model's
    hidden state at ``p`` (after its final norm) and ``sequence[p + 1]``, the MTP block attending
    causally over positions ``0..p``. The flags give vLLM's variant (no final norm, position 0's
    embedding zeroed) for guard tests."""
    from transformers import AutoModelForCausalLM
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
        Ernie4_5_MoeDecoderLayer,
        Ernie4_5_MoeMLP,
    )

    tensors = load_tensors(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    )
    config = model.config
    block = Ernie4_5_MoeDecoderLayer(config, layer_idx=0)
    assert isinstance(block.mlp, Ernie4_5_MoeMLP), "the MTP block's MLP is dense"
    prefix = "model.mtp_block.0."
    block.load_state_dict(
        {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    )
    eps = config.rms_norm_eps
    ids = torch.tensor([sequence])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, :-1]
        embeddings = model.model.embed_tokens(ids[0, 1:])
        if zero_position_0:
            embeddings[0] = 0
        joined = torch.cat(
            [
                rms_norm(embeddings, tensors["model.mtp_emb_norm.0.weight"], eps),
                rms_norm(hidden, tensors["model.mtp_hidden_norm.0.weight"], eps),
            ],
            dim=-1,
        )
        x = (joined @ tensors["model.mtp_linear_proj.0.weight"].T)[None]
        positions = torch.arange(x.shape[1])[None]
        causal = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        x = block(
            x,
            attention_mask=causal,
            position_ids=positions,
            position_embeddings=model.model.rotary_emb(x, positions),
        )
        if final_norm:
            x = model.model.norm(x)
        return model.lm_head(x)[0].argmax(-1).tolist()


def drafts_vllm_asks_for(
    sequence: list[int], prompt_len: int, drafts: list[int], max_tokens: int
) -> list[int]:
    """The drafts of greedy speculative decoding with one speculative token, step by step.

    After the target commits token ``c`` (the first one at prefill), the drafter proposes the
    guess made at position ``c - 1``; if it equals token ``c + 1`` the target accepts it and adds
    one more (``c += 2``), else it replaces it (``c += 1``)."""
    last = prompt_len + max_tokens - 1
    proposals = []
    committed = prompt_len
    while committed < last:
        guess = drafts[committed - 1]
        proposals.append(guess)
        committed += 2 if guess == sequence[committed + 1] else 1
    return proposals
