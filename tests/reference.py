"""Independent references: transformers' Ernie4_5_MoeForCausalLM, and vLLM's closeness rule."""

from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = [
    "What's Deep Learning?",
    "The quick brown fox jumps over the lazy dog. Question: is fire cold? Answer:",
    "A mixture of experts routes each token",
    "User: hello. Assistant:",
]


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per step: token id -> logprob


def prompt_token_ids(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


def transformers_greedy(
    path: Path, dtype: str, max_tokens: int, top_k: int, zero_bias: bool = False
) -> list[Generation]:
    """Greedy generation with transformers; per step the top_k log-probabilities (fp32)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        if zero_bias:
            for name, param in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    param.zero_()
        results = []
        for ids in prompt_token_ids(path):
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            steps = []
            for logits in out.logits:
                logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                values, indices = logprobs.topk(top_k)
                steps.append(dict(zip(indices.tolist(), values.tolist())))
            results.append(Generation(out.sequences[0, len(ids) :].tolist(), steps))
        return results


def vllm_generations(outputs) -> list[Generation]:
    return [
        Generation(
            list(o.outputs[0].token_ids),
            [{tid: lp.logprob for tid, lp in step.items()} for step in o.outputs[0].logprobs],
        )
        for o in outputs
    ]


def check_logprobs_close(reference: list[Generation], tested: list[Generation]) -> None:
    """vLLM's rule (tests/models/utils.py): greedy tokens agree until the first difference, and
    there each side's token is among the other side's top-k; nothing is compared after it."""
    for i, (ref, got) in enumerate(zip(reference, tested, strict=True)):
        for step, (ref_tok, got_tok) in enumerate(zip(ref.token_ids, got.token_ids)):
            if ref_tok == got_tok:
                continue
            assert ref_tok in got.logprobs[step] and got_tok in ref.logprobs[step], (
                f"prompt {i} step {step}: reference token {ref_tok} vs {got_tok}, "
                f"reference top-k {ref.logprobs[step]}, tested top-k {got.logprobs[step]}"
            )
            break
