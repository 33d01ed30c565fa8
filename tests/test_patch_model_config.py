"""patch_model_config: msModelSlim ERNIE checkpoints get ernie-w8a8-dynamic, and only they do."""

import json
import shutil
from pathlib import Path

import pytest
from vllm.config import ModelConfig

from vllm_ernie_moe.patches import patch_model_config

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def plugin():
    """What vLLM's plugin loader runs: registers the method and applies the patches."""
    import vllm_ernie_moe

    vllm_ernie_moe.register()
    assert patch_model_config.apply()  # already active: idempotent


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
    assert not patch_model_config.claims(model_config)


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


def test_a_changed_target_is_left_alone(monkeypatch):
    """The patch wraps only the code it was tested against (its AST fingerprint)."""

    def changed(self) -> None:
        pass

    monkeypatch.setattr(ModelConfig, "_verify_quantization", changed)
    assert patch_model_config.apply() is False
    assert ModelConfig._verify_quantization is changed
