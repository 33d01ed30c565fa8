"""Parity check: does vLLM + this plugin compute what transformers computes for these weights?

    python -m vllm_ernie_moe.tools.parity /weights/ERNIE-4.5-21B-A3B-PT [--dtype bfloat16] [--tp 2]
    python -m vllm_ernie_moe.tools.parity /weights/W8A8 --reference /weights/ERNIE-4.5-21B-A3B-PT

vLLM generates greedily from a prompt set; then transformers (on the CPU) scores vLLM's own
sequences with teacher forcing, so one early difference does not cascade. Reported: greedy-token
agreement, log-probability drift of vLLM's tokens (mean, max) and the worst position, and a verdict
(exit code 0 when it passes, 1 when it does not). ``--reference`` scores with another checkpoint,
e.g. the BF16 original of a quantized one. transformers holds the whole model in CPU memory.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from vllm_ernie_moe.tools.cli import add_engine_arguments, check_engine_arguments, command, engine

DEFAULT_PROMPTS = [
    "What's Deep Learning?",
    "Explain mixture-of-experts models in one paragraph.",
    "Write a haiku about the sea.",
    "The capital of France is",
    "def fibonacci(n):",
    "Translate to Chinese: Good morning, how are you?",
]
# Largest tolerated |logprob drift| by model dtype: fp32 differs only by summation order; 16-bit
# activations drift by up to ~0.15 on tiny random models (tests/reference.py measures it).
DEFAULT_MAX_DRIFT = {"float32": 0.01, "bfloat16": 0.5, "float16": 0.5}


@dataclass
class Verdict:
    positions: int
    agreement: float
    mean_drift: float
    max_drift: float
    worst: str
    passed: bool


Sequence = tuple[list[int], list[int], list[float]]  # prompt ids, generated ids, their logprobs


def vllm_sequences(args: argparse.Namespace, prompts: list[str]) -> list[Sequence]:
    """Per prompt: prompt ids, generated ids, vLLM's logprob of each generated id."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=1)
    with engine(args) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    sequences = []
    for output in outputs:
        generated = list(output.outputs[0].token_ids)
        logprobs = [step[t].logprob for t, step in zip(generated, output.outputs[0].logprobs)]
        sequences.append((list(output.prompt_token_ids), generated, logprobs))
    return sequences


def score(args: argparse.Namespace, sequences: list[Sequence]) -> Verdict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.reference or args.model, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    agree, drifts, worst = 0, [], (0.0, "")
    with torch.no_grad():
        for number, (prompt, generated, logprobs) in enumerate(sequences):
            ids = torch.tensor([prompt + generated])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            reference = torch.log_softmax(logits, dim=-1)
            for step, (token, logprob) in enumerate(zip(generated, logprobs)):
                agree += int(reference[step].argmax()) == token
                drift = abs(logprob - float(reference[step, token]))
                drifts.append(drift)
                if drift >= worst[0]:
                    worst = (drift, f"prompt {number} step {step}")
    count = len(drifts)
    max_drift = args.max_drift or DEFAULT_MAX_DRIFT[args.dtype]
    agreement = agree / count
    passed = agreement >= args.min_agreement and worst[0] <= max_drift
    return Verdict(count, agreement, sum(drifts) / count, worst[0], worst[1], passed)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_ernie_moe.tools.parity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", help="checkpoint served by vLLM (directory or hub id)")
    parser.add_argument("--reference", help="checkpoint transformers scores with (default: model)")
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--max-tokens", type=int, default=32)
    add_engine_arguments(parser, dtype="float32")
    parser.add_argument("--min-agreement", type=float, default=0.95)
    parser.add_argument("--max-drift", type=float, help="default by dtype: fp32 0.01, 16-bit 0.5")
    parser.add_argument("--json", type=Path, help="also write the verdict here")
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args)
    if args.dtype == "auto":
        parser.error("--dtype must be explicit: transformers scores in that dtype")
    if args.prompts and not args.prompts.is_file():
        parser.error(f"--prompts {args.prompts} is not a file")
    prompts = (
        [p for p in args.prompts.read_text().splitlines() if p.strip()]
        if args.prompts
        else DEFAULT_PROMPTS
    )
    verdict = score(args, vllm_sequences(args, prompts))
    print(
        f"\npositions {verdict.positions}  greedy agreement {verdict.agreement:.3f}  "
        f"logprob drift mean {verdict.mean_drift:.2e} max {verdict.max_drift:.2e} "
        f"({verdict.worst})\nverdict: {'PASS' if verdict.passed else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(verdict.__dict__, indent=2))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
