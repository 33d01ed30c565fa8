"""Long context: a 32K-token prompt in fp32, against transformers, on ERNIE-4.5's 131072 positions.

ERNIE-4.5 declares ``max_position_embeddings`` 131072 with rope theta 5e5 (the MindIE reference
marks long sequences unsupported). Every prompt position's logprob and a greedy continuation are
compared. The check can fail: with rope theta 1e4 instead, the same model's logprobs move by a
median of 0.06 (measured), four orders of magnitude above the tolerance.
"""

from pathlib import Path

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_ernie_moe.tools.random_checkpoint import build_checkpoint

PROMPT_TOKENS, NEW_TOKENS, TOP_K = 32768, 8, 5
# fp32 both sides; measured max 7e-6 over the 32K positions.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(
        tmp_path_factory.mktemp("long"), "tiny-21b", max_position_embeddings=131072
    )


@pytest.fixture(scope="module")
def prompt(long_checkpoint) -> list[int]:
    import json

    vocab = json.loads((long_checkpoint / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (PROMPT_TOKENS,), generator=generator).tolist()


def transformers_logprobs(path: Path, ids: list[int], rope_theta: float | None = None):
    """fp32 log-probabilities of every prompt position and of a greedy continuation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    if rope_theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prompt = torch.log_softmax(out.logits[0, :-1], dim=-1)
        prompt = prompt.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        cache, logits, tokens, steps = out.past_key_values, out.logits[0, -1], [], []
        for _ in range(NEW_TOKENS):
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens.append(int(logprobs.argmax()))
            steps.append(logprobs)
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
    return prompt, tokens, steps


@pytest.fixture(scope="module")
def served(long_checkpoint, prompt):
    llm = LLM(
        model=str(long_checkpoint),
        dtype="float32",
        max_model_len=PROMPT_TOKENS + NEW_TOKENS,
        max_num_seqs=1,
        max_num_batched_tokens=4096,  # chunked prefill: the prompt in 8 chunks
        enforce_eager=True,
    )
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, logprobs=TOP_K, prompt_logprobs=0, ignore_eos=True
    )
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    llm.llm_engine.engine_core.shutdown()
    prompt_logprobs = torch.tensor(
        [out.prompt_logprobs[pos][tok].logprob for pos, tok in enumerate(prompt) if pos > 0]
    )
    completion = out.outputs[0]
    steps = [{tok: lp.logprob for tok, lp in step.items()} for step in completion.logprobs]
    return prompt_logprobs, list(completion.token_ids), steps


def test_32k_prompt_matches_transformers_fp32(long_checkpoint, prompt, served):
    prompt_logprobs, tokens, steps = served
    ref_prompt, ref_tokens, ref_steps = transformers_logprobs(long_checkpoint, prompt)
    drift = (prompt_logprobs - ref_prompt).abs()
    assert drift.max() < TOLERANCE, f"position {int(drift.argmax()) + 1}: {drift.max():.2e}"
    assert tokens == ref_tokens
    for step, ref in zip(steps, ref_steps, strict=True):
        for token, logprob in step.items():
            assert abs(logprob - ref[token].item()) < TOLERANCE


def test_positions_matter_at_this_length(long_checkpoint, prompt, served):
    """The rotary frequencies change the answer here: theta 1e4 is far outside the tolerance."""
    wrong, _, _ = transformers_logprobs(long_checkpoint, prompt, rope_theta=1e4)
    assert (served[0] - wrong).abs().median() > 100 * TOLERANCE
