"""msModelSlim formats and bad input: the offline tool, description parsing, load-time checks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import description_of, load_tensors
from safetensors.torch import save_file
from transformers import Ernie4_5_MoeConfig

from vllm_ernie_moe.checkpoint import CheckpointError, CheckpointValidator
from vllm_ernie_moe.quant.msmodelslim import (
    QuantizationFormatError,
    load_description,
    quantize_rows,
    unpack_int4_rows,
)
from vllm_ernie_moe.tools import quantize

FIXTURES = Path(__file__).parent / "fixtures"
BF16_SOURCE = FIXTURES / "ernie-tiny-bf16"
MSMODELSLIM = FIXTURES / "ernie-tiny-w8a8-msmodelslim"
MSMODELSLIM_W8A16 = FIXTURES / "ernie-tiny-w8a16-msmodelslim"
MSMODELSLIM_W4A8 = FIXTURES / "ernie-tiny-w4a8-msmodelslim"
MSMODELSLIM_W4A16 = FIXTURES / "ernie-tiny-w4a16-msmodelslim"


@pytest.mark.parametrize(
    "fmt,msmodelslim",
    [
        ("w8a8-dynamic", MSMODELSLIM),
        ("w8a16", MSMODELSLIM_W8A16),
        ("w4a8-dynamic", MSMODELSLIM_W4A8),
    ],
)
def test_offline_tool_reproduces_msmodelslim_bit_for_bit(tmp_path, fmt, msmodelslim):
    out = tmp_path / "out"
    quantize.main(["--model", str(BF16_SOURCE), "--output", str(out), "--format", fmt])
    ours, theirs = load_tensors(out), load_tensors(msmodelslim)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert description_of(out) == description_of(msmodelslim)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").read_bytes() == (BF16_SOURCE / "tokenizer.json").read_bytes()


def test_config_without_tie_key_gets_the_tied_lm_head_msmodelslim_writes(tmp_path):
    """transformers (and vLLM) tie ERNIE's lm_head when config.json omits the key: the tool must
    resolve the default as they do and write ``lm_head.weight`` labelled FLOAT."""
    source = tmp_path / "untagged"
    shutil.copytree(BF16_SOURCE, source)
    config = json.loads((source / "config.json").read_text())
    del config["tie_word_embeddings"]
    (source / "config.json").write_text(json.dumps(config))
    assert Ernie4_5_MoeConfig.from_pretrained(str(source)).tie_word_embeddings
    out = quantize.quantize_checkpoint(source, tmp_path / "out")
    assert description_of(out)["lm_head.weight"] == "FLOAT"
    tensors = load_tensors(out)
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_msmodelslim_scales_of_a_bf16_model_survive_bf16_storage():
    """vllm-ascend's A2/A3 W8A8 methods keep weight_scale in the model dtype: lossless only because
    msModelSlim computes the scales of a BF16 model in bf16 (docs/ascend.md, NPU/CPU parity)."""
    scales = [t for n, t in load_tensors(MSMODELSLIM).items() if n.endswith("weight_scale")]
    assert scales and all(s.dtype == torch.float32 for s in scales)
    assert all(torch.equal(s.bfloat16().float(), s) for s in scales)
    assert all(torch.equal(s.half().float(), s) for s in scales)


def test_formula_matches_msmodelslim_including_clamp_to_minus_128():
    source, theirs = load_tensors(BF16_SOURCE), load_tensors(MSMODELSLIM)
    clamped = 0
    for name in theirs:
        if theirs[name].dtype == torch.int8:
            q, s = quantize_rows(source[name])
            assert torch.equal(q, theirs[name]) and torch.equal(s, theirs[f"{name}_scale"]), name
            clamped += int((q == -128).sum())
    assert clamped > 0, "bf16 scales round down: some weights must reach -128"


def test_cli_refuses_output_inside_input(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(BF16_SOURCE, source)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_ernie_moe.tools.quantize",
            "--model",
            str(source),
            "--output",
            str(source / "w8a8"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "overlaps the input" in done.stderr and "Traceback" not in done.stderr


def test_cli_rejects_bad_arguments(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_ernie_moe.tools.quantize",
            "--model",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "is not a directory" in done.stderr


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    calls = []

    def full_disk(self, name, tensor):
        calls.append(name)
        if len(calls) > 10:
            raise OSError(28, "No space left on device")
        self.pending[name] = tensor

    monkeypatch.setattr(quantize.ShardWriter, "add", full_disk)
    with pytest.raises(OSError):
        quantize.quantize_checkpoint(BF16_SOURCE, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a partial directory


def test_peak_memory_stays_far_below_the_model_size(tmp_path):
    """1 GiB of bf16 linear weights, 64 MiB shards: the tool's peak RSS grows by far less."""
    source = tmp_path / "big"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    for shard in range(4):
        save_file(
            {
                f"model.layers.{shard * 8 + i}.mlp.up_proj.weight": torch.ones(
                    4096, 4096, dtype=torch.bfloat16
                )
                for i in range(8)
            },
            str(source / f"model-{shard}.safetensors"),
        )
    probe = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from vllm_ernie_moe.tools.quantize import quantize_checkpoint\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "quantize_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), shard_size_gb=1 / 16)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mib = int(done.stdout.strip().splitlines()[-1])
    assert growth_mib < 400, f"peak RSS grew by {growth_mib} MiB for a 1024 MiB model"


def write_description(tmp_path: Path, **changes) -> Path:
    description = dict(description_of(MSMODELSLIM), **changes)
    path = tmp_path / "quant_model_description.json"
    path.write_text(json.dumps(description))
    return path


@pytest.mark.parametrize("label", ["W8A8", "W8A8_MIX", "W4A4_DYNAMIC", "W4A16_MIX"])
def test_unsupported_labels_are_named(tmp_path, label):
    tensor = "model.layers.1.self_attn.o_proj.weight"
    with pytest.raises(QuantizationFormatError, match=rf"'{tensor}' has label '{label}'"):
        load_description(write_description(tmp_path, **{tensor: label}))


def test_group_quantization_is_rejected(tmp_path):
    with pytest.raises(QuantizationFormatError, match="group_size=128"):
        load_description(write_description(tmp_path, group_size=128))


def test_quantized_router_is_rejected(tmp_path):
    tensor = "model.layers.1.mlp.gate.weight"
    with pytest.raises(
        QuantizationFormatError, match=rf"'{tensor}' is labelled W8A8_DYNAMIC.*router"
    ):
        load_description(write_description(tmp_path, **{tensor: "W8A8_DYNAMIC"}))


def test_fused_3d_experts_are_rejected(tmp_path):
    tensor = "model.layers.1.mlp.experts.gate_up_proj"
    with pytest.raises(QuantizationFormatError, match="fused 3-D expert tensor"):
        load_description(write_description(tmp_path, **{tensor: "W8A8_DYNAMIC"}))


def validate(description_path: Path, tensors: dict) -> None:
    """Validate against the config beside the description (a fixture's), else the W8A8 one's."""
    directory = description_path.parent
    directory = directory if (directory / "config.json").is_file() else MSMODELSLIM
    config = Ernie4_5_MoeConfig(**json.loads((directory / "config.json").read_text()))
    validator = CheckpointValidator(config, directory, load_description(description_path))
    for _ in validator.check(tensors.items()):
        pass
    validator.check_complete()


@pytest.mark.parametrize(
    "fixture",
    [MSMODELSLIM, MSMODELSLIM_W8A16, MSMODELSLIM_W4A8, MSMODELSLIM_W4A16],
    ids=["w8a8", "w8a16", "w4a8", "w4a16"],
)
def test_fixture_passes_validation(fixture):
    validate(fixture / "quant_model_description.json", load_tensors(fixture))


def test_int4_unpacking_reproduces_msmodelslims_own_scale_bias():
    """msModelSlim computed ``scale_bias`` (8 x row sums, in 16 column groups for down_proj) from
    its unpacked int4 weights: the plugin's unpacking must give the same sums."""
    tensors = load_tensors(MSMODELSLIM_W4A8)
    checked = 0
    for name, scale_bias in tensors.items():
        if not name.endswith(".scale_bias"):
            continue
        module = name.removesuffix(".scale_bias")
        weight = unpack_int4_rows(tensors[f"{module}.weight"]).float()
        weight = weight * tensors[f"{module}.weight_scale"]
        sums = 8 * weight.reshape(weight.shape[0], scale_bias.shape[1], -1).sum(-1)
        torch.testing.assert_close(sums, scale_bias, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 2 * 8 * 3  # 2 MoE layers x 8 experts x gate/up/down


def test_w4a8_outside_the_routed_experts_is_refused(tmp_path):
    tensor = "model.layers.1.mlp.shared_experts.down_proj.weight"
    with pytest.raises(QuantizationFormatError, match=rf"'{tensor}' is labelled W4A8_DYNAMIC"):
        load_description(write_description(tmp_path, **{tensor: "W4A8_DYNAMIC"}))


def test_mispacked_int4_expert_is_named():
    """An unpacked [out, in] tensor under the W4A8_DYNAMIC label: refused by name and shape."""
    tensors = load_tensors(MSMODELSLIM_W4A8)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    tensors[name] = unpack_int4_rows(tensors[name])
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[64, 64\].*\[32, 64\]"):
        validate(MSMODELSLIM_W4A8 / "quant_model_description.json", tensors)


def test_mispacked_w4a16_scale_is_named():
    """A per-channel [out, 1] scale under a per-group W4A16 label: refused by name and shape."""
    tensors = load_tensors(MSMODELSLIM_W4A16)
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    tensors[name] = tensors[name][:, :1]
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[64, 1\].*\[64, 4\]"):
        validate(MSMODELSLIM_W4A16 / "quant_model_description.json", tensors)


def test_w8a16_label_on_a_float_weight_is_named(tmp_path):
    """W8A16 promises int8 weights: a bf16 weight under that label is refused, by name."""
    tensors = load_tensors(MSMODELSLIM_W8A16)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=rf"'{name}' is torch.bfloat16 but labelled W8A16"):
        validate(MSMODELSLIM_W8A16 / "quant_model_description.json", tensors)


def test_nonzero_weight_offset_is_rejected():
    tensors = load_tensors(MSMODELSLIM)
    name = "model.layers.2.mlp.experts.4.down_proj.weight_offset"
    tensors[name] = torch.ones_like(tensors[name])
    with pytest.raises(CheckpointError, match=rf"'{name}' is non-zero"):
        validate(MSMODELSLIM / "quant_model_description.json", tensors)


def test_missing_scale_is_named():
    tensors = load_tensors(MSMODELSLIM)
    del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
    with pytest.raises(
        CheckpointError, match="missing: model.layers.0.self_attn.k_proj.weight_scale"
    ):
        validate(MSMODELSLIM / "quant_model_description.json", tensors)


def test_description_naming_absent_tensors_is_rejected(tmp_path):
    path = write_description(tmp_path, **{"model.layers.9.mlp.up_proj.weight": "FLOAT"})
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        validate(path, load_tensors(MSMODELSLIM))


@pytest.mark.parametrize(
    "tensor,module",
    [
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj"),
        ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts"),
    ],
)
def test_fused_module_shards_with_different_labels_are_rejected(tmp_path, tensor, module):
    """Also experts: vllm-ascend reads only expert 0's label and would load such a file."""
    checkpoint = tmp_path / "mixed"
    shutil.copytree(MSMODELSLIM, checkpoint)
    write_description(checkpoint, **{tensor: "FLOAT"})
    with pytest.raises(QuantizationFormatError, match=f"'{module}' have different labels"):
        load_description(checkpoint / "quant_model_description.json")


def test_engine_refuses_an_unsupported_label_before_starting(tmp_path):
    """The error comes from vLLM's config step in the calling process: no engine soup."""
    from vllm import LLM

    checkpoint = tmp_path / "static"
    shutil.copytree(MSMODELSLIM, checkpoint)
    write_description(checkpoint, **{"model.layers.0.self_attn.q_proj.weight": "W8A8"})
    # vLLM's pydantic config wraps the error (a ValueError) with our message intact.
    with pytest.raises(ValueError, match="q_proj.weight' has label 'W8A8'; only W8A8_DYNAMIC"):
        LLM(model=str(checkpoint), max_model_len=256, enforce_eager=True)


def test_flat_and_model_dtype_scales_are_accepted():
    tensors = load_tensors(MSMODELSLIM)
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    tensors[name] = tensors[name].reshape(-1).to(torch.bfloat16)
    config = Ernie4_5_MoeConfig(**json.loads((MSMODELSLIM / "config.json").read_text()))
    description = load_description(MSMODELSLIM / "quant_model_description.json")
    validator = CheckpointValidator(config, MSMODELSLIM, description)
    loaded = dict(validator.check(tensors.items()))
    validator.check_complete()
    assert loaded[name].shape == (64, 1)
    assert not any(n.endswith("weight_offset") for n in loaded)  # checked zero, not loaded


def test_offline_tool_rejects_fused_expert_tensors(tmp_path):
    source = tmp_path / "fused"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    save_file({name: torch.zeros(8, 64, 64)}, str(source / "model.safetensors"))
    with pytest.raises(quantize.QuantizeError, match=rf"'{name}' is a fused 3-D expert tensor"):
        quantize.quantize_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
