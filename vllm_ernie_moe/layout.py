"""The ERNIE-4.5 MoE ``-PT`` checkpoint layout as data, and the rules derived from it.

One place for what the tensors are called, which vLLM module runs them (q/k/v as ``qkv_proj``,
gate/up as ``gate_up_proj``, all routed experts of a layer as one ``experts``), the router's bias
rename, the MTP head's names, which projections are quantizable or row-parallel, the expected
shapes and which layers are MoE layers. The model's weight mapper and ``packed_modules_mapping``,
the msModelSlim description checks, the offline quantizer, the checkpoint validator and the LoRA
targets all read it: a new tensor or fusion is one edit here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: Linear projections a quantized checkpoint may quantize; everything else (embeddings, lm_head,
#: norms, the router ``mlp.gate`` and its correction bias) stays FLOAT.
QUANTIZABLE_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
#: Projections vLLM splits along their input (RowParallelLinear).
ROW_PARALLEL_PROJECTIONS = ("o_proj", "down_proj")

#: vLLM module -> (checkpoint projection, vLLM shard id), in shard order.
FUSIONS: dict[str, tuple[tuple[str, str | int], ...]] = {
    "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
}
#: Where a fusion applies: ``gate_up_proj`` in the dense MLP and the shared experts only; the
#: routed experts' gate/up are loaded by FusedMoE itself.
FUSION_PARENTS = {"qkv_proj": ("",), "gate_up_proj": (".mlp", ".shared_experts")}
#: vLLM's module of all routed experts of a layer (``mlp.experts.N.*`` in the checkpoint).
EXPERTS = "experts"
#: transformers 5 holds all experts of a layer as 3-D tensors ``mlp.experts.<name>`` (not a -PT
#: layout: msModelSlim needs per-expert linears).
FUSED_EXPERT_TENSORS = ("gate_up_proj", "down_proj")

#: The router's correction bias: stored [1, E] under ``moe_statics``, a [E] parameter of the gate.
CORRECTION_BIAS = "mlp.moe_statics.e_score_correction_bias"
#: transformers 5 may save the bias under the router's name.
CORRECTION_BIAS_TRANSFORMERS = "mlp.gate.moe_statics.e_score_correction_bias"
CORRECTION_BIAS_RENAME = {".moe_statics.e_score_correction_bias": ".gate.e_score_correction_bias"}

#: The MTP head's modules, ``model.<part>.<i>.*`` for MTP layer ``i``: the drafter's, not the
#: model's.
MTP_PARTS = ("mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block")

#: vLLM modules LoRA adapts on CPU: attention, dense MLPs, shared experts (not routed experts).
CPU_LORA_MODULES = [*FUSIONS, *ROW_PARALLEL_PROJECTIONS]


def stacked_renames() -> dict[str, tuple[str, str | int]]:
    """Checkpoint name part -> (vLLM name part, shard id), for ``WeightsMapper``."""
    return {
        f"{parent}.{projection}": (f"{parent}.{fused}", shard)
        for fused, shards in FUSIONS.items()
        for parent in FUSION_PARENTS[fused]
        for projection, shard in shards
    }


def packed_modules_mapping() -> dict[str, list[str]]:
    """Fused vLLM module -> checkpoint modules. ``experts`` lets per-layer quantization lookups
    (vllm-ascend's msModelSlim loader) resolve FusedMoE to expert 0's checkpoint tensors."""
    mapping = {fused: [projection for projection, _ in shards] for fused, shards in FUSIONS.items()}
    mapping[EXPERTS] = [f"{EXPERTS}.0.{projection}" for projection in MLP_PROJECTIONS]
    return mapping


def first_checkpoint_module(module: str) -> str:
    """The checkpoint module whose description label a vLLM module takes: the first shard of a
    fusion, expert 0's gate for the routed experts, else the module itself."""
    parent, _, name = module.rpartition(".")
    shards = packed_modules_mapping().get(name)
    return f"{parent}.{shards[0]}" if shards else module


def fused_module_of(tensor: str) -> str | None:
    """The vLLM module that runs checkpoint weight ``tensor`` fused with others, if any."""
    parts = tensor.split(".")
    if len(parts) < 4 or parts[-1] != "weight":
        return None
    projection = parts[-2]
    if parts[-4] == EXPERTS and projection in MLP_PROJECTIONS:
        return ".".join(parts[:-3])
    for fused, shards in FUSIONS.items():
        if projection in (name for name, _ in shards):
            return ".".join([*parts[:-2], fused])
    return None


def is_quantizable_weight(name: str) -> bool:
    """``model.layers.N.<...>.{q,k,v,o,gate,up,down}_proj.weight``: a linear weight."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in QUANTIZABLE_PROJECTIONS


def is_routed_expert(tensor: str) -> bool:
    """A routed expert's tensor (``mlp.experts.E.*``), not a shared expert's: where
    W4A8_DYNAMIC applies."""
    return f".mlp.{EXPERTS}." in tensor


def checkpoint_module(module: str) -> str:
    """vLLM's module name -> the checkpoint's: vLLM's ``FusedMoEFactory`` (0.27.1 to 0.33) holds
    a layer's routed experts in ``<...>.mlp.experts.routed_experts``, the checkpoint under
    ``<...>.mlp.experts``."""
    return module.removesuffix(".routed_experts")


def is_paddle_tensor_name(name: str) -> bool:
    """``-Paddle`` checkpoints use the ``ernie.`` prefix and fused qkv / up_gate projections."""
    return name.startswith("ernie.") or ".qkv_proj." in name or ".up_gate_proj." in name


def is_mtp_tensor_name(name: str) -> bool:
    """Multi-token-prediction head tensors (speculative decoding), not part of the main model."""
    return ".mtp_" in name or name.startswith("mtp")


def moe_layer_ids(config: PretrainedConfig) -> list[int]:
    """Indices of the MoE layers: ``(i + 1) % interval == 0 and start <= i <= end``.

    ``moe_layer_end_index == -1`` means the last layer; a config without experts has none.
    """
    num_layers = config.num_hidden_layers
    if getattr(config, "moe_num_experts", 0) <= 0 or not getattr(config, "use_moe", True):
        return []
    start = getattr(config, "moe_layer_start_index", 0)
    end = getattr(config, "moe_layer_end_index", num_layers - 1)
    if end == -1:
        end = num_layers - 1
    interval = getattr(config, "moe_layer_interval", 1)
    return [i for i in range(num_layers) if (i + 1) % interval == 0 and start <= i <= end]


def _mlp_shapes(prefix: str, hidden: int, inner: int, bias: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.gate_proj.weight": (inner, hidden),
        f"{prefix}.up_proj.weight": (inner, hidden),
        f"{prefix}.down_proj.weight": (hidden, inner),
    }
    if bias:
        shapes.update(
            {
                f"{prefix}.gate_proj.bias": (inner,),
                f"{prefix}.up_proj.bias": (inner,),
                f"{prefix}.down_proj.bias": (hidden,),
            }
        )
    return shapes


def expected_tensor_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``-PT`` checkpoint for this config holds, with its full (unsharded) shape."""
    hidden, vocab = config.hidden_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    use_bias = bool(getattr(config, "use_bias", False))
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    moe_layers = set(moe_layer_ids(config))
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            shapes[f"{layer}.self_attn.{name}_proj.weight"] = (rows * head_dim, hidden)
            if use_bias:
                shapes[f"{layer}.self_attn.{name}_proj.bias"] = (rows * head_dim,)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if i not in moe_layers:
            shapes.update(_mlp_shapes(f"{layer}.mlp", hidden, config.intermediate_size, use_bias))
            continue
        experts, inner = config.moe_num_experts, config.moe_intermediate_size
        shapes[f"{layer}.mlp.gate.weight"] = (experts, hidden)
        shapes[f"{layer}.{CORRECTION_BIAS}"] = (1, experts)
        for e in range(experts):
            shapes.update(_mlp_shapes(f"{layer}.mlp.{EXPERTS}.{e}", hidden, inner, use_bias))
        shared = getattr(config, "moe_num_shared_experts", 0)
        if shared > 0:
            shapes.update(
                _mlp_shapes(f"{layer}.mlp.shared_experts", hidden, inner * shared, use_bias)
            )
    return shapes
