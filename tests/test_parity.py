"""Parity of the plugin (real vLLM CPU engine) with transformers' Ernie4_5_MoeForCausalLM.

One engine at a time: pytest keeps one instance of the module-scoped ``engine`` fixture alive and
tears it down before the next parameter. Both geometries carry a correction bias that changes the
experts chosen (asserted against transformers), so a router that ignores the bias fails here.
"""

import os
from contextlib import contextmanager

import pytest
import torch
from reference import (
    check_logprobs_close,
    prompt_token_ids,
    transformers_greedy,
    vllm_generations,
)
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

MAX_TOKENS = 32
TOP_K = 5
FP32_LOGPROB_TOLERANCE = 1e-3
GEOMETRIES = ["tiny-21b", "tiny-300b"]

# (geometry, dtype, tensor parallel size, torch.compile, KV cache dtype); TP=1 before TP=2 of the
# same geometry. The fp8 KV cache is held to vLLM's closeness rule against transformers in bf16.
ENGINES = [
    ("tiny-21b", "float32", 1, False, "auto"),
    ("tiny-300b", "float32", 1, False, "auto"),
    ("tiny-21b", "bfloat16", 1, True, "auto"),
    ("tiny-300b", "bfloat16", 1, False, "auto"),
    ("tiny-21b", "bfloat16", 1, False, "fp8"),
    ("tiny-21b", "float16", 1, False, "auto"),
    ("tiny-dense", "float32", 1, False, "auto"),
    ("tiny-21b", "float32", 2, False, "auto"),
    ("tiny-300b", "float32", 2, False, "auto"),
]
_results: dict[tuple, list] = {}


@contextmanager
def environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module", params=ENGINES, ids=lambda e: f"{e[0]}-{e[1]}-tp{e[2]}-kv{e[4]}")
def engine(request, checkpoint):
    geometry, dtype, tp, compiled, kv_cache_dtype = request.param
    if kv_cache_dtype == "fp8" and not torch.cpu._is_avx512_supported():
        pytest.skip("vLLM's CPU attention has no fp8 KV cache without AVX-512 (refused at start: "
                    "tests/test_cpu_tier.py)")  # fmt: skip
    path = checkpoint(geometry)
    # On one NUMA node, TP=2 on CPU needs an explicit core per rank.
    binding = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else {}
    with environment(**binding):
        llm = LLM(
            model=str(path),
            dtype=dtype,
            tensor_parallel_size=tp,
            max_model_len=512,
            max_num_seqs=8,
            enforce_eager=not compiled,
            kv_cache_dtype=kv_cache_dtype,
            seed=0,
        )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(path)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP_K, ignore_eos=True)
    outputs = vllm_generations(llm.generate(prompts, params, use_tqdm=False))
    _results[request.param] = outputs
    yield request.param, path, outputs
    llm.llm_engine.engine_core.shutdown()
    del llm


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_correction_bias_changes_transformers_output(checkpoint, geometry):
    """Guards the other tests: with this bias, ignoring it gives different tokens."""
    path = checkpoint(geometry)
    with_bias = transformers_greedy(path, "float32", MAX_TOKENS, TOP_K)
    without = transformers_greedy(path, "float32", MAX_TOKENS, TOP_K, zero_bias=True)
    assert any(a.token_ids != b.token_ids for a, b in zip(with_bias, without))


def test_matches_transformers(engine):
    (geometry, dtype, tp, *_), path, outputs = engine
    reference = transformers_greedy(path, dtype, MAX_TOKENS, TOP_K)
    if dtype != "float32":
        check_logprobs_close(reference, outputs)
        return
    for i, (ref, got) in enumerate(zip(reference, outputs, strict=True)):
        assert got.token_ids == ref.token_ids, f"prompt {i}: greedy tokens differ"
        for step, (ref_step, got_step) in enumerate(zip(ref.logprobs, got.logprobs)):
            assert ref_step.keys() == got_step.keys(), f"prompt {i} step {step}: top-5 differ"
            worst = max(abs(ref_step[t] - got_step[t]) for t in ref_step)
            assert worst < FP32_LOGPROB_TOLERANCE, f"prompt {i} step {step}: logprob off by {worst}"


def test_tensor_parallel_matches_tp1(engine):
    (geometry, dtype, tp, compiled, kv_cache_dtype), _, outputs = engine
    if tp == 1:
        pytest.skip("TP=1 is the baseline")
    baseline = _results.get((geometry, dtype, 1, compiled, kv_cache_dtype))
    assert baseline is not None, "the TP=1 engine of this geometry must run first"
    for got, ref in zip(outputs, baseline, strict=True):
        assert got.token_ids == ref.token_ids
        for got_step, ref_step in zip(got.logprobs, ref.logprobs):
            assert got_step.keys() == ref_step.keys()
            assert max(abs(got_step[t] - ref_step[t]) for t in ref_step) < 1e-4
