"""Build ERNIE-4.5-MoE checkpoints with random weights, locally, with transformers.

No model hub is needed: the tokenizer is a byte-level BPE trained on a short embedded text and the
weights come from transformers' own ``Ernie4_5_MoeForCausalLM`` initialisation. The router is given
random weights (transformers 5 initialises it to zeros, which sends every token to the same experts)
and a correction bias large enough to change which experts are chosen. These checkpoints exist for
the dialog example's default, the tests and the benchmarks; their answers are meaningless.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN_OF_SENTENCE = "<|begin_of_sentence|>"
END_OF_SENTENCE = "<|end_of_sentence|>"
SPECIAL_TOKENS = ["<unk>", BEGIN_OF_SENTENCE, END_OF_SENTENCE]  # ids 0, 1, 2 as in ERNIE

RANDOM_WEIGHTS_NOTICE = (
    "This checkpoint has RANDOM weights, generated locally by "
    "vllm_ernie_moe.tools.random_checkpoint with the ERNIE-4.5-MoE architecture. "
    "Its output is gibberish by design."
)

_TOKENIZER_TEXT = """
Deep learning is a branch of machine learning that trains neural networks with many layers.
What's Deep Learning? It is the study of models that learn representations from data.
A mixture of experts routes each token to a few expert networks chosen by a router.
Question: is the sky blue? Answer: yes. Question: is fire cold? Answer: no.
The quick brown fox jumps over the lazy dog. User: hello. Assistant: hello, how can I help you?
Large language models answer questions, write text, translate languages and summarise documents.
Paged attention stores the key and value cache in blocks so that many requests share memory.
Tensor parallelism splits every weight matrix across devices and sums the partial results.
"""


@dataclass(frozen=True)
class Geometry:
    """Config fields of one checkpoint family, and how large its random router and bias are."""

    config: dict[str, Any]
    router_std: float
    bias_std: float
    notes: str = ""


_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=32,
    moe_num_experts=8,
    moe_intermediate_size=32,
    initializer_range=0.08,
    max_position_embeddings=4096,
)


def _tiny(notes: str, **config: Any) -> Geometry:
    """A tiny geometry: a router and bias strong enough that the bias changes the chosen experts."""
    return Geometry(config=dict(_TINY_COMMON, **config), router_std=0.3, bias_std=0.15, notes=notes)


GEOMETRIES: dict[str, Geometry] = {
    "tiny-21b": _tiny(
        "21B-A3B-like: dense layer 0, 2 shared experts, tied lm_head, MoE to the last layer (-1)",
        num_hidden_layers=3,
        num_key_value_heads=2,
        moe_k=3,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        tie_word_embeddings=True,
    ),
    # One KV head, so that TP=2 replicates it.
    "tiny-300b": _tiny(
        "300B-A47B-like: dense layers 0-1, no shared experts, untied lm_head, moe_k 4, 1 KV head",
        num_hidden_layers=5,
        num_key_value_heads=1,
        moe_k=4,
        moe_num_shared_experts=0,
        moe_layer_start_index=2,
        moe_layer_end_index=4,
        tie_word_embeddings=False,
    ),
    # The seed's largest world sizes: heads enough to shard over 8 and 16 ranks, fewer KV heads than
    # ranks (each KV head is replicated), expert and MLP widths that leave every rank 8 columns.
    "tp8-21b": _tiny(
        "21B-A3B-like for TP 1-8: 8 heads, 2 KV heads, 2 shared experts, tied lm_head",
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=64,
        moe_k=3,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        tie_word_embeddings=True,
    ),
    "ws16-300b": _tiny(
        "300B-A47B-like for world size 16: 16 heads, 4 KV heads, 16 experts (vLLM's ERNIE "
        "refuses fewer experts than ranks), no shared experts, untied",
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        moe_num_experts=16,
        intermediate_size=128,
        moe_intermediate_size=128,
        moe_k=4,
        moe_num_shared_experts=0,
        moe_layer_start_index=2,
        moe_layer_end_index=3,
        tie_word_embeddings=False,
    ),
    "tiny-dense": _tiny(
        "no MoE layer: the MoE range starts past the last layer",
        num_hidden_layers=2,
        num_key_value_heads=2,
        moe_k=2,
        moe_num_shared_experts=0,
        moe_layer_start_index=2,
        moe_layer_end_index=-1,
        tie_word_embeddings=True,
    ),
    # The exact ERNIE-4.5-21B-A3B geometry with 4 layers (dense layer 0 + 3 MoE layers).
    "21b-4layers": Geometry(
        config=dict(
            hidden_size=2560,
            intermediate_size=12288,
            num_hidden_layers=4,
            num_attention_heads=20,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=103424,
            moe_num_experts=64,
            moe_k=6,
            moe_intermediate_size=1536,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            moe_layer_end_index=3,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
        ),
        router_std=0.02,
        bias_std=0.002,
        notes="ERNIE-4.5-21B-A3B geometry, 4 layers",
    ),
}


def build_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = 1024, texts: list[str] | None = None
):
    """Train a byte-level BPE tokenizer on ``texts`` (default: the embedded text) and save it in
    HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or [_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = ernie_tokenizer(tokenizer, cls_token=BEGIN_OF_SENTENCE, sep_token=END_OF_SENTENCE)
    fast.save_pretrained(str(out_dir))
    return fast


def ernie_tokenizer(tokenizer, **fields: Any):
    """A ``tokenizers.Tokenizer`` as a transformers tokenizer with ERNIE's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token=BEGIN_OF_SENTENCE,
        eos_token=END_OF_SENTENCE,
        **fields,
    )


def _config(out: Path, geometry: str, overrides: dict[str, Any]):
    """The transformers config of ``geometry`` with ``overrides``, after writing its tokenizer."""
    from transformers import Ernie4_5_MoeConfig

    tokenizer = build_tokenizer(out)
    fields = dict(GEOMETRIES[geometry].config, **overrides)
    fields.setdefault("vocab_size", len(tokenizer))
    return Ernie4_5_MoeConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_bias=False, **fields
    )


def _finish_config(
    out: Path, geometry: str, overrides: dict[str, Any], notes: str, **fields
) -> None:
    """Rewrite the saved config.json as Baidu writes it (transformers turns ``moe_layer_end_index``
    -1 into the last layer's index), add the random-weights notice and a README."""
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    written = dict(GEOMETRIES[geometry].config, **overrides)
    saved["moe_layer_end_index"] = written["moe_layer_end_index"]
    saved["_random_weights_notice"] = RANDOM_WEIGHTS_NOTICE
    config_path.write_text(json.dumps(dict(saved, **fields), indent=2))
    (out / "README.md").write_text(
        f"# Random ERNIE-4.5-MoE checkpoint ({geometry})\n\n{RANDOM_WEIGHTS_NOTICE}\n\n"
        f"Geometry: {GEOMETRIES[geometry].notes}. {notes}\n"
    )


def build_checkpoint(
    out_dir: str | os.PathLike,
    geometry: str = "tiny-21b",
    dtype: str = "float32",
    seed: int = 0,
    mtp: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) to out_dir; with ``mtp``
    also a random MTP head, as -PT checkpoints carry one (transformers has none to write)."""
    import torch
    from transformers import Ernie4_5_MoeForCausalLM

    spec = GEOMETRIES[geometry]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(out, geometry, config_overrides)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM._from_config(config, dtype=torch_dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(gate, "moe_statics"):
                continue
            gate.weight.normal_(0.0, spec.router_std, generator=generator)
            bias = gate.moe_statics.e_score_correction_bias
            bias.normal_(0.0, spec.bias_std, generator=generator)
    model.save_pretrained(str(out))
    extra = {"num_nextn_predict_layers": 1} if mtp else {}
    _finish_config(out, geometry, config_overrides, f"dtype {dtype}, seed {seed}.", **extra)
    if mtp:
        _add_random_mtp_head(out / "model.safetensors", config, generator)
    return out


def build_int4_checkpoint(
    out_dir: str | os.PathLike,
    geometry: str = "21b-4layers",
    *,
    label: str = "W4A8_DYNAMIC",
    seed: int = 0,
    shard_size_gb: float = 2.0,
    group_size: int = 128,
    **config_overrides: Any,
) -> Path:
    """Write a random msModelSlim W4A8_DYNAMIC or W4A16 (``label``) checkpoint one tensor at a
    time: memory stays at about two shards (one and its serialized copy), so the whole
    ERNIE-4.5-21B-A3B (``num_hidden_layers=28``, 12.4 GB on disk as W4A8_DYNAMIC) builds on this
    project's machines.

    W4A8_DYNAMIC's routed experts get random int4 values and per-row scales directly (msModelSlim's
    ssz search, as the offline tool runs it, takes ~4 s per expert matrix: 6 hours for 21B); every
    other tensor is drawn in bf16 and converted by the offline tool's own code (W8A8_DYNAMIC, W4A16
    per ``group_size`` inputs, FLOAT).
    """
    import torch

    from vllm_ernie_moe.layout import (
        expected_tensor_shapes,
        is_quantizable_weight,
        is_routed_expert,
    )
    from vllm_ernie_moe.quant.msmodelslim import (
        FLOAT,
        W4A8_DYNAMIC,
        W4A16,
        int4_scale_bias,
        pack_int4_rows,
        scale_bias_groups,
        scale_bias_name,
    )
    from vllm_ernie_moe.tools.quantize import ShardWriter, converted, write_description

    spec = GEOMETRIES[geometry]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(out, geometry, config_overrides)
    std = config.initializer_range
    int4_scale = std / 4.6  # 4.6: the std of values uniform on -8..7
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_tensor_shapes(config)
    writer = ShardWriter(out, int(shard_size_gb * 2**30))
    labels: dict[str, str] = {}

    def normal(shape, scale, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, scale, generator=generator).to(dtype)

    for name, shape in shapes.items():
        if label == W4A8_DYNAMIC and is_routed_expert(name) and is_quantizable_weight(name):
            values = torch.randint(-8, 8, shape, dtype=torch.int8, generator=generator)
            scale = torch.empty(shape[0], 1).uniform_(0.8, 1.2, generator=generator) * int4_scale
            tensors = [
                (name, pack_int4_rows(values)),
                (scale_bias_name(name), int4_scale_bias(values, scale, scale_bias_groups(name))),
                (f"{name}_scale", scale),
                (f"{name}_offset", torch.zeros_like(scale)),
            ]
            written = [(n, t, W4A8_DYNAMIC) for n, t in tensors]
        elif name.endswith("mlp.gate.weight"):
            written = [(name, normal(shape, spec.router_std, torch.float32), FLOAT)]
        elif name.endswith("e_score_correction_bias"):
            written = [(name, normal(shape, spec.bias_std, torch.float32), FLOAT)]
        elif name.endswith("norm.weight"):
            written = [(name, torch.ones(shape, dtype=torch.bfloat16), FLOAT)]
        elif name == "model.embed_tokens.weight":
            embedding = normal(shape, std)
            written = [(name, embedding, FLOAT)]
            if config.tie_word_embeddings:  # msModelSlim writes the tied head
                written.append(("lm_head.weight", embedding.clone(), FLOAT))
        else:
            written = converted(name, normal(shape, std), label, group_size)
        for out_name, tensor, tensor_label in written:
            writer.add(out_name, tensor)
            labels[out_name] = tensor_label
    writer.finish()
    write_description(out, labels, label, group_size if label == W4A16 else 0)
    config.save_pretrained(str(out))
    notes = f"{label} random int4, seed {seed}."
    fields = dict(dtype="bfloat16", architectures=["Ernie4_5_MoeForCausalLM"])
    _finish_config(out, geometry, config_overrides, notes, **fields)
    return out


def _add_random_mtp_head(file: Path, config, generator) -> None:
    """Add ``model.mtp_*.0.*`` in the -PT layout: two norms, the [H, 2H] projection, a decoder
    layer with a dense MLP (``intermediate_size``). The final norm the head shares gets weights
    other than ones: with ones, leaving it out would only scale the logits (same drafts)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    hidden, head_dim = (
        config.hidden_size,
        config.head_dim or config.hidden_size // config.num_attention_heads,
    )
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "mtp_emb_norm.0.weight": (hidden,),
        "mtp_hidden_norm.0.weight": (hidden,),
        "mtp_linear_proj.0.weight": (hidden, 2 * hidden),
        "mtp_block.0.input_layernorm.weight": (hidden,),
        "mtp_block.0.post_attention_layernorm.weight": (hidden,),
        "mtp_block.0.self_attn.q_proj.weight": (q, hidden),
        "mtp_block.0.self_attn.k_proj.weight": (kv, hidden),
        "mtp_block.0.self_attn.v_proj.weight": (kv, hidden),
        "mtp_block.0.self_attn.o_proj.weight": (hidden, q),
        "mtp_block.0.mlp.gate_proj.weight": (config.intermediate_size, hidden),
        "mtp_block.0.mlp.up_proj.weight": (config.intermediate_size, hidden),
        "mtp_block.0.mlp.down_proj.weight": (hidden, config.intermediate_size),
    }
    dtype = tensors["model.embed_tokens.weight"].dtype
    shapes["norm.weight"] = (hidden,)
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms near 1, not exactly: a skipped norm must show
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.08
        tensors[f"model.{name}"] = tensor.to(dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})
