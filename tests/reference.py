"""Independent references: transformers' Ernie4_5_MoeForCausalLM, and vLLM's closeness rule."""

from __future__ import annotations

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

    @classmethod
    def from_completion(cls, logprobs: dict) -> Generation:
        """From an OpenAI completion's ``logprobs`` asked with ``return_tokens_as_token_ids``."""

        def token_id(token: str) -> int:
            return int(token.removeprefix("token_id:"))

        return cls(
            [token_id(t) for t in logprobs["tokens"]],
            [{token_id(t): lp for t, lp in step.items()} for step in logprobs["top_logprobs"]],
        )


def prompt_token_ids(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


def transformers_greedy(
    path: Path,
    dtype: str,
    max_tokens: int,
    top_k: int,
    zero_bias: bool = False,
    prepare=None,
) -> list[Generation]:
    """Greedy generation with transformers; per step the top_k log-probabilities (fp32).

    ``prepare(model)`` may modify the loaded model first (e.g. fake quantization)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        if zero_bias:
            for name, param in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    param.zero_()
        if prepare is not None:
            prepare(model)
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


def vllm_greedy(path: Path, dtype: str, tp: int, max_tokens: int, top_k: int) -> list[Generation]:
    """Greedy generation on the prompts with a vLLM engine of its own (TP ranks bound one core
    each), which is shut down before returning."""
    import os

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    saved = dict(os.environ)
    if tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(rank) for rank in range(tp))
    try:
        llm = LLM(
            model=str(path),
            dtype=dtype,
            tensor_parallel_size=tp,
            max_model_len=512,
            max_num_seqs=8,
            enforce_eager=True,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(path)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=top_k, ignore_eos=True)
    outputs = vllm_generations(llm.generate(prompts, params, use_tqdm=False))
    llm.llm_engine.engine_core.shutdown()
    return outputs


def served_greedy(
    client, model: str, prompts: list[list[int]], max_tokens: int
) -> list[Generation]:
    """Greedy completions of a ``vllm serve`` (an openai ``client``) with the top-5
    log-probabilities per step, by token id."""
    generations = []
    for ids in prompts:
        reply = client.completions.create(
            model=model,
            prompt=ids,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        generations.append(Generation.from_completion(reply.choices[0].logprobs.model_dump()))
    return generations


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


def logprob_drift(reference: list[Generation], tested: list[Generation]) -> torch.Tensor:
    """Per step, the largest |logprob difference| over tokens both top-k lists hold, up to and
    including each prompt's first differing token."""
    drift = []
    for ref, got in zip(reference, tested, strict=True):
        for step, (ref_step, got_step) in enumerate(zip(ref.logprobs, got.logprobs)):
            drift.append(max(abs(ref_step[t] - got_step[t]) for t in ref_step.keys() & got_step))
            if ref.token_ids[step] != got.token_ids[step]:
                break
    return torch.tensor(drift)


# vLLM bf16 against transformers fp32 on the BF16 fixture, no quantization (measured): max 0.127,
# 90th percentile 0.012. W8A8 comparisons in bf16 must stay within that noise.
BF16_DRIFT_MAX, BF16_DRIFT_P90 = 0.15, 0.03


def assert_bf16_drift(
    reference: list[Generation], tested: list[Generation], p90: float = BF16_DRIFT_P90
) -> None:
    drift = logprob_drift(reference, tested)
    assert drift.max() < BF16_DRIFT_MAX, f"largest logprob drift {drift.max():.3f}"
    assert drift.quantile(0.9) < p90, f"90th percentile drift {drift.quantile(0.9):.3f}"


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization in ``x``'s dtype: the integer values (not cast to int8)
    and the per-row scale ``max|row| / 127``; an all-zero (padding) row gets scale 1."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -128, 127), scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantization (what W8A8_DYNAMIC does at run time)."""
    quantized, scale = int8_rows(x)
    return quantized * scale


def description_of(directory: Path) -> dict:
    """A msModelSlim checkpoint's description JSON, metadata included."""
    import json

    return json.loads((directory / "quant_model_description.json").read_text())


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a directory."""
    from safetensors import safe_open

    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def int8_rows_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 quantization as msModelSlim computes it for a bf16 weight (scale and
    division in bf16, docs/w8a8.md), dequantized to fp32."""
    quantized, scale = int8_rows(weight.bfloat16())
    return quantized.float() * scale.float()


def unpacked_int4(packed: torch.Tensor) -> torch.Tensor:
    """msModelSlim's W4A8 / W4A16 packing read nibble by nibble: packed row j holds row 2j in its
    low 4 bits and row 2j + 1 in its high 4 bits, each two's complement."""
    nibbles = packed.to(torch.int16) & 0xFF
    low, high = nibbles & 0xF, nibbles >> 4
    rows = torch.empty(2 * packed.shape[0], packed.shape[1], dtype=torch.int16)
    rows[0::2], rows[1::2] = low, high
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)


def dequantized_checkpoint(
    quantized_dir: Path,
    out_dir: Path,
    int8_lm_head: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """A plain -PT checkpoint whose int8 linears hold ``int8 * scale`` in fp32; with
    ``int8_lm_head`` also an untied lm_head quantized the same way (the embedding stays as is).
    ``scale_dtype``: round the scales first (vllm-ascend's A2/A3 methods keep them in bf16)."""
    import json
    import shutil

    from safetensors.torch import save_file

    description = json.loads((quantized_dir / "quant_model_description.json").read_text())
    tensors = load_tensors(quantized_dir)
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith(("_scale", "_offset", ".scale_bias")):
            continue
        label = description.get(name)
        if label in ("W4A8_DYNAMIC", "W4A16"):
            tensor = unpacked_int4(tensor)
        if label in ("W8A8_DYNAMIC", "W8A16", "W4A8_DYNAMIC", "W4A16"):
            scale = tensors[f"{name}_scale"].to(scale_dtype).float()
            # W4A16: one scale per group of inputs, [out, in / group] -> [out, in]
            scale = scale.repeat_interleave(tensor.shape[1] // scale.shape[1], dim=1)
            tensor = tensor.float() * scale
        plain[name] = tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((quantized_dir / "config.json").read_text())
    if int8_lm_head:
        head = plain.get("lm_head.weight", plain["model.embed_tokens.weight"])
        plain["lm_head.weight"] = int8_rows_dequantized(head)
        config["tie_word_embeddings"] = False
    save_file(plain, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config))
    for item in quantized_dir.iterdir():
        if item.name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def group_quantizer(group: int):
    """Symmetric int8 fake quantization per group of ``group`` inputs (:func:`int8_rows` on each
    group): the AVX2 W4A16 kernel's activations."""

    def quantize(x: torch.Tensor) -> torch.Tensor:
        quantized, scale = int8_rows(x.unflatten(-1, (-1, group)))
        return (quantized * scale).flatten(-2)

    return quantize


def fake_quantize_activations(model, lm_head: bool = False, quantize=None) -> None:
    """Quantize the input of every linear (and of each expert GEMM) per token, as W8A8 does (or
    with ``quantize``); the lm_head's too with ``lm_head``."""
    import types

    import torch.nn.functional as F
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeExperts

    quantize = quantize or quantize_activations

    def linear_forward(self, x):
        return F.linear(quantize(x), self.weight, self.bias)

    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            x = quantize(hidden_states[token])
            gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(quantize(self.act_fn(gate) * up), self.down_proj[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out

    for name, module in model.named_modules():
        if isinstance(module, Ernie4_5_MoeExperts):
            module.forward = types.MethodType(experts_forward, module)
        elif isinstance(module, torch.nn.Linear) and not name.endswith(
            "mlp.gate" if lm_head else ("mlp.gate", "lm_head")
        ):
            module.forward = types.MethodType(linear_forward, module)
