"""What vllm-ascend's bf16 copy of msModelSlim's fp32 scales does to W8A8 answers (A2/A3).

vllm-ascend's W8A8_DYNAMIC methods create ``weight_scale`` in the model dtype, so an fp32 scale
from msModelSlim is rounded to bf16 on A2/A3 (310P keeps fp32); the plugin's CPU method keeps fp32.
This compares two fp32 transformers references of the real msModelSlim fixture, both with
per-token int8 activations (W8A8's run-time math): dequantized with the fp32 scales, and with the
scales rounded to bf16 (or fp16). Teacher-forced over the test prompts and their greedy
continuations. msModelSlim computes the scales of a BF16 model in bf16 and stores them as fp32, so
bf16 storage is expected to be exact; fp16 storage (an FP16 deployment) is not.

    python benchmarks/npu_scale_rounding.py [--checkpoint DIR] [--tokens 32]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from reference import (  # noqa: E402
    PROMPTS,
    dequantized_checkpoint,
    fake_quantize_activations,
    load_tensors,
)


def logprobs(checkpoint: Path, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    fake_quantize_activations(model)
    with torch.no_grad():
        return [torch.log_softmax(model(s[None]).logits[0], dim=-1) for s in sequences]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "tests/fixtures/ernie-tiny-w8a8-msmodelslim"
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--scale-dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="the NPU model dtype the scales are stored in",
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = dequantized_checkpoint(args.checkpoint, Path(tmp) / "fp32")
        scale_dtype = getattr(torch, args.scale_dtype)
        rounded_dir = dequantized_checkpoint(
            args.checkpoint, Path(tmp) / "npu", scale_dtype=scale_dtype
        )
        model = AutoModelForCausalLM.from_pretrained(str(fp32), dtype=torch.float32)
        fake_quantize_activations(model)
        sequences = []
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            sequences.append(out[0])
        reference, rounded = logprobs(fp32, sequences), logprobs(rounded_dir, sequences)
    drift = torch.cat([(a - b).abs().max(dim=-1).values for a, b in zip(reference, rounded)])
    agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference, rounded)])
    scales = [t for n, t in load_tensors(args.checkpoint).items() if n.endswith("weight_scale")]
    result = {
        "scale_dtype": args.scale_dtype,
        "scales_exact_in_that_dtype": all(
            torch.equal(s.to(scale_dtype).float(), s) for s in scales
        ),
        "positions": int(agree.numel()),
        "top1_agreement": round(float(agree.float().mean()), 4),
        "max_abs_logprob_drift": round(float(drift.max()), 5),
        "p90_abs_logprob_drift": round(float(drift.quantile(0.9)), 5),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
