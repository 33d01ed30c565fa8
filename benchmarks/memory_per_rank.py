"""Weight memory per rank of the real ERNIE-4.5-21B-A3B and -300B-A47B, per format and world size,
computed from their geometry (docs/multinode.md's table), as vLLM shards them with tensor
parallelism and no expert parallelism.

    python benchmarks/memory_per_rank.py [--json docs/results/memory-per-rank.json]

Every tensor of ``layout.expected_tensor_shapes`` is split the way its vLLM layer splits it: q and
the column-parallel MLP rows over the ranks; k and v by KV head (a rank holds at least one whole KV
head, so a world size above the KV-head count replicates them); o_proj and down_proj columns over
the ranks; routed experts along their intermediate width; embedding and untied lm_head along the
vocabulary; norms, router and correction bias whole on every rank. Bytes per element: BF16 2;
int8 1 and int4 0.5 for the linear weights a format quantizes, plus an fp32 scale and offset per
output row (W4A16: per 128-input group and row); embeddings, lm_head,
norms and router stay BF16 (fp32 bias). KV cache: BF16 K and V per token and rank. Activations,
vLLM's workspaces and the runtime itself come on top (on vLLM's CPU backend ~0.6-0.8 GB per rank
process was measured with tiny weights: docs/results/world-sizes.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from transformers import Ernie4_5_MoeConfig

from vllm_ernie_moe.layout import (
    CORRECTION_BIAS,
    expected_tensor_shapes,
    is_quantizable_weight,
    is_routed_expert,
)

#: docs: ../shared/notes/ernie45-moe.md's geometry table.
MODELS = {
    "ERNIE-4.5-21B-A3B": dict(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, vocab_size=103424, moe_num_experts=64, moe_k=6,
        moe_intermediate_size=1536, moe_num_shared_experts=2, moe_layer_start_index=1,
        moe_layer_end_index=27, tie_word_embeddings=True,
    ),
    "ERNIE-4.5-300B-A47B": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=103424, moe_num_experts=64, moe_k=8,
        moe_intermediate_size=3584, moe_num_shared_experts=0, moe_layer_start_index=3,
        moe_layer_end_index=53, tie_word_embeddings=False,
    ),
}  # fmt: skip
WORLD_SIZES = {"ERNIE-4.5-21B-A3B": (1, 2, 4, 8), "ERNIE-4.5-300B-A47B": (8, 16)}
#: Bytes per weight element of a quantizable linear: (routed experts, every other linear), and
#: whether its int4 weights carry a scale per 128-input group (W4A16) instead of per row.
FORMATS = {
    "BF16": ((2, 2), False),
    "W8A8 / W8A16": ((1, 1), False),
    "W4A8": ((0.5, 1), False),
    "W4A16": ((0.5, 0.5), True),
}
GROUP = 128
SCALE_AND_OFFSET = 8  # fp32 each


def rank_share(name: str, shape: tuple[int, ...], config, world: int) -> int:
    """Elements of ``name`` one rank of ``world`` holds."""
    elements = math.prod(shape)
    if name.endswith("norm.weight") or ".mlp.gate." in name or CORRECTION_BIAS in name:
        return elements
    if name.split(".")[-2] in ("k_proj", "v_proj"):
        kv_heads = config.num_key_value_heads
        return elements // kv_heads * max(1, kv_heads // world)
    return math.ceil(elements / world)


def per_rank_gb(model: str, world: int, fmt: str) -> float:
    (expert_bytes, other_bytes), grouped = FORMATS[fmt]
    config = Ernie4_5_MoeConfig(**MODELS[model])
    total = 0.0
    for name, shape in expected_tensor_shapes(config).items():
        share = rank_share(name, shape, config, world)
        if not is_quantizable_weight(name):
            total += share * (4 if CORRECTION_BIAS in name else 2)
            continue
        per_element = expert_bytes if is_routed_expert(name) else other_bytes
        if per_element < 2:  # quantization parameters, spread over the elements they scale
            per_element += SCALE_AND_OFFSET / (GROUP if grouped else shape[-1])
        total += share * per_element
    return round(total / 1e9, 2)


def layout_of(model: str, world: int) -> tuple[int, int]:
    """(TP, DP): vLLM needs the attention heads divisible by TP, so a world size they do not divide
    (21B-A3B's 20 heads over 8 ranks) runs as the largest TP that divides both, times DP."""
    heads = MODELS[model]["num_attention_heads"]
    tp = max(d for d in range(1, world + 1) if world % d == 0 and heads % d == 0)
    return tp, world // tp


def kv_cache_kb_per_token(model: str, world: int) -> float:
    spec = MODELS[model]
    kv_heads = max(1, spec["num_key_value_heads"] // world)
    return round(spec["num_hidden_layers"] * 2 * kv_heads * spec["head_dim"] * 2 / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for model, worlds in WORLD_SIZES.items():
        for world in worlds:
            tp, dp = layout_of(model, world)
            row = {"model": model, "world_size": world, "layout": f"TP {tp} x DP {dp}",
                   "kv_cache_kb_per_token": kv_cache_kb_per_token(model, tp)}  # fmt: skip
            row.update({fmt: per_rank_gb(model, tp, fmt) for fmt in FORMATS})
            rows.append(row)
    header = ["model", "world_size", "layout", *FORMATS, "kv_cache_kb_per_token"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")
    if args.json:
        args.json.write_text(json.dumps({"gb_per_rank": rows, "notes": __doc__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
