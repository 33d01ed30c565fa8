"""Greedy drift on the 21B geometry: how long each quantized variant's greedy tokens stay those of
the BF16 model it was quantized from, in vLLM with the plugin.

The checkpoint is ``bench_engines.py``'s BF16 21B-geometry one (transformers' random init, 4
layers by default) and its W8A8_DYNAMIC and W4A16 versions made by the plugin's offline tool from
it, so every variant has the same weights up to quantization. Each variant runs in a fresh
process; its greedy tokens for random prompts are compared with the BF16 engine's: per prompt the
number of leading tokens that agree. Random weights give near-flat logits, so a small error flips
the argmax sooner than in a trained model: compare variants with each other; the trained model's
drift is in ``bench_small_model.py``, beside its perplexity.

    python benchmarks/greedy_drift.py --cache /work/bench/cache --json out.json
"""

import argparse
import json
import os
import statistics
from pathlib import Path

from bench_engines import (
    checkpoint_paths,
    greedy_token_ids,
    random_prompts,
    run_child,
    vllm_engine,
)

PROMPTS, PROMPT_LEN, TOKENS = 16, 32, 32
#: variant -> (checkpoint kind, environment); the others are compared with bf16 unless --reference.
VARIANTS = {
    "bf16": ("bf16", {}),
    "w8a8": ("w8a8", {}),
    "w4a16": ("w4a16", {}),
    "w4a16-bf16-inputs": ("w4a16", {"VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS": "0"}),
    "w4a16-int8-head": ("w4a16", {"VLLM_ERNIE_MOE_INT8_LM_HEAD": "1"}),
    "w4a16-int4-prefill": ("w4a16", {"VLLM_ERNIE_MOE_W4A16_INT8_PREFILL": "0"}),
}


def greedy(checkpoint: str) -> list[list[int]]:
    """This process's engine's greedy tokens for the benchmark's prompts."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    llm = vllm_engine(checkpoint)
    generated = greedy_token_ids(llm, random_prompts(PROMPTS, PROMPT_LEN, vocab, 0), TOKENS)
    llm.llm_engine.engine_core.shutdown()  # before the child's os._exit
    return generated


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    """Leading tokens equal in both."""
    for position, (token, expected) in enumerate(zip(tokens, reference, strict=True)):
        if token != expected:
            return position
    return len(reference)


def checkpoints(cache: Path, layers: int) -> dict[str, Path]:
    """BF16, W8A8_DYNAMIC and W4A16 (groups of 128) of the same weights, made once."""
    from vllm_ernie_moe.tools.quantize import W4A16, quantize_checkpoint

    bf16, w8a8 = checkpoint_paths(cache, layers)
    w4a16 = cache / f"21b-{layers}layers-w4a16-of-bf16"
    if not (w4a16 / "config.json").exists():
        quantize_checkpoint(bf16, w4a16, label=W4A16)
    return {"bf16": bf16, "w8a8": w8a8, "w4a16": w4a16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="bench_engines.py's checkpoint cache")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--reference",
        choices=VARIANTS,
        default="bf16",
        help="the variant the others are compared with (w4a16-int4-prefill: the int8 copy alone)",
    )
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[2]).write_text(json.dumps(greedy(args.child[1])))
        # Written: leave without the interpreter's teardown, where vLLM's CPU engine now and then
        # aborts (as bench_small_model.py's children).
        os._exit(0)
    if not args.cache:
        parser.error("give --cache")
    cache = Path(args.cache)
    paths = checkpoints(cache, args.layers)
    tokens = {}
    for variant in dict.fromkeys([args.reference, *args.variants]):
        kind, env = VARIANTS[variant]
        out = cache / f"drift-{variant}.json"
        tokens[variant] = run_child(__file__, variant, paths[kind], out, env)
    report = {
        "layers": args.layers,
        "prompts": PROMPTS,
        "tokens": TOKENS,
        "reference": args.reference,
        "variants": {},
    }
    for variant, generated in tokens.items():
        prefixes = [
            agreeing_prefix(t, r) for t, r in zip(generated, tokens[args.reference], strict=True)
        ]
        report["variants"][variant] = {
            "mean_agreeing_prefix": statistics.mean(prefixes),
            "median_agreeing_prefix": statistics.median(prefixes),
            "prompts_identical": sum(p == TOKENS for p in prefixes),
            "agreeing_prefixes": prefixes,
        }
        print(variant, report["variants"][variant], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
