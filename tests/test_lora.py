"""LoRA on vLLM's CPU backend: several adapters in one batch give transformers' output with each
adapter merged into the weights (fp32, same greedy tokens); adapters or target lists that name the
routed experts are refused with the module names instead of being ignored or crashing."""

import pytest
from peft_adapter import DENSE_MODULES, merged, write_adapter
from reference import prompt_token_ids, transformers_greedy, vllm_generations
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

MAX_TOKENS = 16
TOP_K = 5
FP32_LOGPROB_TOLERANCE = 1e-3
#: name -> (modules, seed): every module LoRA adapts on CPU; the row-parallel ones only.
ADAPTERS = {"all-dense": (DENSE_MODULES, 0), "down-and-o": (["o_proj", "down_proj"], 1)}


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    path = checkpoint("tiny-21b")
    root = tmp_path_factory.mktemp("adapters")
    return path, {
        name: write_adapter(path, root / name, modules, seed=seed)
        for name, (modules, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def llm(adapters):
    path, _ = adapters
    engine = LLM(
        model=str(path),
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=512,
        max_num_seqs=16,
        enforce_eager=True,
        seed=0,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def references(path, adapter_dir=None):
    prepare = merged(adapter_dir) if adapter_dir is not None else None
    return transformers_greedy(path, "float32", MAX_TOKENS, TOP_K, prepare=prepare)


def test_each_adapter_changes_the_reference_output(adapters):
    """Guards the parity test: an adapter that changed nothing would prove nothing."""
    path, dirs = adapters
    base = references(path)
    for name, directory in dirs.items():
        with_adapter = references(path, directory)
        changed = sum(a.token_ids != b.token_ids for a, b in zip(base, with_adapter))
        assert changed >= len(base) / 2, f"{name}: only {changed} of {len(base)} prompts change"


def test_adapters_mixed_in_one_batch_match_transformers_with_merged_weights(adapters, llm):
    path, dirs = adapters
    requests = {None: None} | {
        name: LoRARequest(name, i + 1, str(directory))
        for i, (name, directory) in enumerate(dirs.items())
    }
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(path)]
    # Interleaved, so that each step's batch holds both adapters and the base model.
    batch = [(name, i) for i in range(len(prompts)) for name in requests]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP_K, ignore_eos=True)
    outputs = vllm_generations(
        llm.generate(
            [prompts[i] for _, i in batch],
            params,
            lora_request=[requests[name] for name, _ in batch],
            use_tqdm=False,
        )
    )
    expected = {name: references(path, dirs.get(name)) for name in requests}
    for (name, i), got in zip(batch, outputs, strict=True):
        ref = expected[name][i]
        assert got.token_ids == ref.token_ids, f"adapter {name}, prompt {i}: greedy tokens differ"
        for step, (ref_step, got_step) in enumerate(zip(ref.logprobs, got.logprobs)):
            worst = max(abs(ref_step[t] - got_step[t]) for t in ref_step.keys() & got_step)
            assert worst < FP32_LOGPROB_TOLERANCE, f"{name} prompt {i} step {step}: off by {worst}"


def test_an_adapter_with_routed_expert_tensors_is_refused_by_name(adapters, llm, tmp_path):
    """vLLM's CPU LoRA has no MoE path: such an adapter must not load with its experts ignored."""
    path, _ = adapters
    directory = write_adapter(path, tmp_path / "experts", ["gate_proj"], routed_experts=True)
    with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj"):
        llm.llm_engine.add_lora(LoRARequest("experts", 9, str(directory)))
    # The engine is still serving.
    assert llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("targets", [["experts"], ["o_proj", "gate"]])
def test_routed_expert_targets_are_refused_at_configuration(checkpoint, targets):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(checkpoint("tiny-21b")),
        enable_lora=True,
        lora_target_modules=targets,
        max_model_len=512,
    )
    with pytest.raises(ValueError, match=r"not supported on vLLM's CPU backend.*no MoE path"):
        args.create_engine_config()


def test_default_targets_leave_the_routed_experts_alone(checkpoint):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(
        model=str(checkpoint("tiny-21b")), enable_lora=True, max_model_len=512
    ).create_engine_config()
    assert "experts" not in config.lora_config.target_modules
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} == set(
        config.lora_config.target_modules
    )
