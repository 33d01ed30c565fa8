"""config_hooks: msModelSlim ERNIE checkpoints get ernie-w8a8-dynamic (on an NPU: a name vllm-ascend
detects), and only they do; vLLM calls the hooks for the architecture."""

import json
import shutil
from pathlib import Path

import pytest
from vllm.config import ModelConfig

from vllm_ernie_moe import ARCHITECTURE, config_hooks

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def plugin():
    """What vLLM's plugin loader runs: registers the method and the hooks."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import vllm_ernie_moe

    vllm_ernie_moe.register()
    assert MODELS_CONFIG_MAP[ARCHITECTURE] is config_hooks.ErnieMoeConfigHooks


def test_msmodelslim_checkpoint_is_detected():
    config = ModelConfig(model=str(FIXTURES / "ernie-tiny-w8a8-msmodelslim"))
    assert config.quantization == "ernie-w8a8-dynamic"


def test_v0_description_name_is_detected(tmp_path):
    checkpoint = tmp_path / "v0"
    shutil.copytree(FIXTURES / "ernie-tiny-w8a8-msmodelslim", checkpoint)
    (checkpoint / "quant_model_description.json").rename(
        checkpoint / "quant_model_description_w8a8_dynamic.json"
    )
    assert ModelConfig(model=str(checkpoint)).quantization == "ernie-w8a8-dynamic"


def test_plain_checkpoint_is_left_alone():
    assert ModelConfig(model=str(FIXTURES / "ernie-tiny-bf16")).quantization is None


def test_explicit_flag_wins():
    config = ModelConfig(model=str(FIXTURES / "ernie-tiny-bf16"), quantization="ernie-w8a8-dynamic")
    assert config.quantization == "ernie-w8a8-dynamic"


def test_other_architectures_are_not_claimed(tmp_path):
    checkpoint = tmp_path / "other"
    shutil.copytree(FIXTURES / "ernie-tiny-w8a8-msmodelslim", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["SomeOtherForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    model_config = ModelConfig.__new__(ModelConfig)
    model_config.__dict__.update(
        quantization=None,
        model=str(checkpoint),
        hf_config=type("Config", (), {"architectures": config["architectures"]})(),
        model_arch_config=type("Arch", (), {"quantization_config": None})(),
    )
    assert config_hooks.unflagged_description(model_config) is None


@pytest.fixture
def on_npu(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "npu")


def _v0_checkpoint(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "v0"
    shutil.copytree(FIXTURES / "ernie-tiny-w8a8-msmodelslim", checkpoint)
    (checkpoint / "quant_model_description.json").rename(
        checkpoint / "quant_model_description_w8a8_dynamic.json"
    )
    return checkpoint


def test_npu_refuses_a_description_name_vllm_ascend_does_not_detect(tmp_path, on_npu):
    """vllm-ascend detects only quant_model_description.json: it would load int8 as BF16."""
    # QuantizationFormatError is a ValueError; vLLM's pydantic config re-raises it as one.
    with pytest.raises(ValueError, match="rename the file to quant_model_description.json"):
        ModelConfig(model=str(_v0_checkpoint(tmp_path)))


def test_npu_leaves_the_method_to_vllm_ascend(on_npu):
    """No ernie-w8a8-dynamic on an NPU: vllm-ascend's platform picks 'ascend' afterwards."""
    assert ModelConfig(model=str(FIXTURES / "ernie-tiny-w8a8-msmodelslim")).quantization is None


def test_an_explicit_npu_method_wins_over_the_name_check(tmp_path, on_npu):
    """--quantization given: the hook leaves the checkpoint to the method asked for."""
    model_config = ModelConfig.__new__(ModelConfig)
    model_config.__dict__.update(
        quantization="ascend",
        model=str(_v0_checkpoint(tmp_path)),
        hf_config=type("Config", (), {"architectures": [ARCHITECTURE]})(),
        model_arch_config=type("Arch", (), {"quantization_config": None})(),
    )
    config_hooks.ErnieMoeConfigHooks.verify_and_update_model_config(model_config)
    assert model_config.quantization == "ascend"


@pytest.mark.parametrize("node_rank", [0, 1])
def test_waits_between_nodes_get_the_plugins_bound_unless_set(node_rank, monkeypatch):
    """torch's defaults leave a node waiting 30 minutes (gloo) for one that never comes."""
    from vllm.config import ParallelConfig

    monkeypatch.delenv("VLLM_ERNIE_MOE_NODE_TIMEOUT", raising=False)
    parallel = ParallelConfig(tensor_parallel_size=4, nnodes=2, node_rank=node_rank)
    config_hooks.bound_waits_between_nodes(parallel)
    assert parallel.distributed_timeout_seconds == parallel.cpu_distributed_timeout_seconds == 900

    monkeypatch.setenv("VLLM_ERNIE_MOE_NODE_TIMEOUT", "60")
    chosen = ParallelConfig(tensor_parallel_size=4, nnodes=2, distributed_timeout_seconds=300)
    config_hooks.bound_waits_between_nodes(chosen)
    assert chosen.distributed_timeout_seconds == chosen.cpu_distributed_timeout_seconds == 300

    one_node = ParallelConfig(tensor_parallel_size=4)
    config_hooks.bound_waits_between_nodes(one_node)
    assert one_node.distributed_timeout_seconds is None


def test_a_bad_node_timeout_is_named(monkeypatch):
    from vllm.config import ParallelConfig

    monkeypatch.setenv("VLLM_ERNIE_MOE_NODE_TIMEOUT", "10m")
    with pytest.raises(ValueError, match="VLLM_ERNIE_MOE_NODE_TIMEOUT='10m': give whole seconds"):
        config_hooks.bound_waits_between_nodes(ParallelConfig(tensor_parallel_size=2, nnodes=2))
