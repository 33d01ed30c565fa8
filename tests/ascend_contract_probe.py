"""Run vllm-ascend's own pure-Python code on CPU against the plugin's model; print JSON facts.

    python tests/ascend_contract_probe.py VLLM_ASCEND_SRC DEVICE    (DEVICE: A2, A3 or _310P)

``torch_npu`` and vllm-ascend's build info are stubbed as vllm-ascend's unit tests do
(``tests/ut/conftest.py``); nothing runs on an NPU. One process per device type: vllm-ascend
fixes its device adaptor at import. ``tests/test_ascend_contract.py`` asserts on the output.
"""

import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from unittest.mock import MagicMock, patch

from single_rank import init_single_rank

FIXTURES = Path(__file__).parent / "fixtures"
BF16 = FIXTURES / "ernie-tiny-bf16"
MSMODELSLIM = FIXTURES / "ernie-tiny-w8a8-msmodelslim"
#: The msModelSlim fixtures the probe loads through vllm-ascend's ``ascend`` method.
QUANTIZED = {
    "w8a8": MSMODELSLIM,
    "w4a8": FIXTURES / "ernie-tiny-w4a8-msmodelslim",
    "w8a16": FIXTURES / "ernie-tiny-w8a16-msmodelslim",
    "w4a16": FIXTURES / "ernie-tiny-w4a16-msmodelslim",
}
#: Routing probe: expert 0 leads the logits; the bias pulls experts 6 and 7 into the top 2.
ROUTING_LOGITS = [[2.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]]
ROUTING_BIAS = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]


def _stub_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def install_npu_stubs(device: str) -> None:
    """What vllm-ascend's ``tests/ut/conftest.py`` installs when no NPU is present."""
    triton_runtime = MagicMock()
    triton_runtime.driver.active.utils.get_device_properties.return_value = {
        "num_aic": 8,
        "num_vectorcore": 8,
    }
    sys.modules["triton.runtime"] = triton_runtime
    torch_npu = _stub_module(
        "torch_npu",
        __path__=[],
        npu=MagicMock(),
        profiler=MagicMock(),
        npu_fusion_attention=MagicMock(),
        npu_format_cast=MagicMock(side_effect=lambda weight, fmt: weight),
        _C=MagicMock(),
        float4_e2m1fn_x2=296,
        hifloat8=290,
        float8_e8m0fnu=293,
    )
    sys.modules["torch_npu._C"] = torch_npu._C
    sys.modules["torch_npu._C._distributed_c10d"] = torch_npu._C._distributed_c10d
    _stub_module("vllm_ascend._build_info", __device_type__=device)
    import torch

    torch.npu = MagicMock()
    torch.npu.is_available = MagicMock(return_value=False)
    torch.version.cann = None


def _classes(model) -> dict[str, str]:
    """Layer class name -> one qualified name where it occurs (quant methods left out)."""
    return {
        type(m).__name__: name
        for name, m in model.named_modules()
        if not name.endswith(".quant_method")
    }


def modelslim_config_class(device: str):
    """vllm-ascend's ``ascend`` method as its platform registers it for the device."""
    if device == "_310P":
        from vllm_ascend._310p.quantization.modelslim_config import AscendModelSlimConfig310

        return AscendModelSlimConfig310
    from vllm_ascend.quantization.modelslim_config import AscendModelSlimConfig

    return AscendModelSlimConfig


def _build(vllm_config, model_cls):
    with (
        patch("vllm_ascend.quantization.methods.w8a8_dynamic.get_mc2_group") as mc2,
        patch("vllm_ascend.quantization.methods.w4a8.get_mc2_group", mc2),
    ):
        mc2.side_effect = AttributeError  # no MC2 communication group on CPU
        return model_cls(vllm_config=vllm_config, prefix="")


def routing_facts(model, device: str) -> dict:
    """The router vllm-ascend gave the first MoE layer, its settings, and what it computes."""
    import torch

    runner = next(m for m in model.modules() if hasattr(m, "router") and hasattr(m, "top_k"))
    router = runner.router
    bias = router.e_score_correction_bias
    facts = {
        "router_class": type(router).__name__,
        "router_mro": [c.__name__ for c in type(router).__mro__],
        "top_k": router.top_k,
        "renormalize": router.renormalize,
        "scoring_func": router.scoring_func,
        "use_grouped_topk": router.use_grouped_topk,
        "custom_routing_function": getattr(router, "custom_routing_function", None) is not None,
        "bias_dtype": str(bias.dtype) if bias is not None else None,
        "bias_is_the_models": bias is not None
        and bias.data_ptr() == model.model.layers[1].mlp.gate.e_score_correction_bias.data_ptr(),
    }
    from vllm_ascend.ops.fused_moe.router.router_factory import check_npu_moe_gating_top_k

    facts["fused_gating_supported"] = check_npu_moe_gating_top_k(
        top_k=router.top_k,
        topk_group=None,
        num_expert_group=None,
        scoring_func=router.scoring_func,
        custom_routing_function=None,
        renormalize=router.renormalize,
    )
    logits = torch.tensor(ROUTING_LOGITS)
    probe_bias = torch.tensor(ROUTING_BIAS)
    router.e_score_correction_bias = probe_bias
    router.top_k = 2
    router.global_num_experts = probe_bias.numel()
    hidden = torch.zeros(1, 16)
    if device == "_310P" or not facts["fused_gating_supported"]:
        from vllm_ernie_moe.patches import patch_ascend_grouped_topk_router as fix

        weights, ids = router._compute_routing(hidden, logits, torch.int32)  # vllm-ascend's own
        facts["unpatched"] = {"ids": ids.tolist(), "weights": weights.float().tolist()}
        fix.patch_router_class(fix.grouped_topk_router_class())
        weights, ids = router._compute_routing(hidden, logits, torch.int32)
        facts["patched"] = {"ids": ids.tolist(), "weights": weights.float().tolist()}
    else:
        from vllm_ascend.device.device_op import DeviceOperator

        recorded = {}

        def moe_gating_top_k(x, **kwargs):
            recorded.update(kwargs, x_dtype=str(x.dtype))
            return torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int32), None

        with patch.object(DeviceOperator, "moe_gating_top_k", moe_gating_top_k):
            router._compute_routing(hidden, logits, torch.int32)
        bias_opt = recorded.pop("bias_opt")
        facts["fused_call"] = dict(
            recorded, bias_opt=bias_opt.tolist(), bias_dtype=str(bias_opt.dtype)
        )
    return facts


def quantization_facts(model, checkpoint: Path) -> dict:
    """Which Ascend method each layer got, and the fixture's tensors in the parameters it made."""
    from safetensors.torch import load_file

    methods = {}
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not prefix:
            continue
        scheme = getattr(method, "quant_method", None)
        methods[prefix] = [type(method).__name__, type(scheme).__name__ if scheme else None]
    tensors = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    model.load_weights(iter(tensors.items()))
    return {
        "methods": methods,
        "parameters": {n: [list(p.shape), str(p.dtype)] for n, p in model.named_parameters()},
        "values": loaded_values(model, tensors),
    }


def expected_value(model, name: str, tensors: dict):
    """What parameter ``name`` must hold after loading, built from the checkpoint tensors."""
    import torch

    module_path, _, leaf = name.rpartition(".")
    if leaf.startswith(("w13_", "w2_")):
        experts = module_path.removesuffix(".routed_experts")
        suffix = leaf.split("_", 1)[1]  # weight, weight_scale, weight_offset
        projections = ["gate_proj", "up_proj"] if leaf.startswith("w13_") else ["down_proj"]
        return torch.stack(
            [
                torch.cat([tensors[f"{experts}.{e}.{p}.{suffix}"] for p in projections])
                for e in range(model.config.moe_num_experts)
            ]
        )
    parent, _, module = module_path.rpartition(".")
    mapping = type(model).packed_modules_mapping
    if module in mapping:
        return torch.cat([tensors[f"{parent}.{shard}.{leaf}"] for shard in mapping[module]])
    checkpoint_name = name.replace(
        ".mlp.gate.e_score_correction_bias", ".mlp.moe_statics.e_score_correction_bias"
    )
    if checkpoint_name == "lm_head.weight" and model.config.tie_word_embeddings:
        checkpoint_name = "model.embed_tokens.weight"
    return tensors[checkpoint_name]


def loaded_values(model, tensors: dict) -> dict[str, bool | None]:
    """Per parameter: does it hold exactly the checkpoint's tensors, cast to the parameter's dtype
    (int8 weights bit-exact, scales rounded as vllm-ascend stores them)? None: no such tensor."""
    import torch

    result = {}
    for name, param in model.named_parameters():
        try:
            expected = expected_value(model, name, tensors)
        except KeyError:
            result[name] = None  # a parameter the checkpoint has no tensor for
            continue
        # Scales and the bias may be stored flat or [1, E]; vocabulary rows are padded.
        rows = expected.shape[0] if expected.numel() != param.numel() else param.shape[0]
        expected = expected.reshape(rows, *param.shape[1:]).to(param.dtype)
        result[name] = bool(torch.equal(param.data[:rows], expected))
    return result


def mixed_label_facts(model, checkpoint: Path) -> dict:
    """vllm-ascend's lookup with expert 3's up_proj relabelled FLOAT, and the plugin's answer."""
    import shutil

    from vllm_ascend.quantization.modelslim_config import get_quant_type_for_layer

    description = json.loads((checkpoint / "quant_model_description.json").read_text())
    mixed = dict(description, **{"model.layers.1.mlp.experts.3.up_proj.weight": "FLOAT"})
    facts = {
        "ascend_quant_type": get_quant_type_for_layer(
            mixed, "model.layers.1.mlp.experts", "moe", type(model).packed_modules_mapping
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mixed"
        shutil.copytree(checkpoint, copy)
        (copy / "quant_model_description.json").write_text(json.dumps(mixed))
        model.checkpoint_dir = str(copy)
        try:
            model.load_weights(iter([]))
            facts["plugin_error"] = None
        except Exception as error:  # noqa: BLE001  (reported, asserted by the test)
            facts["plugin_error"] = f"{type(error).__name__}: {error}"
    return facts


def main() -> None:
    source, device = sys.argv[1], sys.argv[2]
    sys.path.insert(0, source)
    install_npu_stubs(device)
    import vllm

    # The CPU wheel says "0.27.1+cpu"; vllm-ascend's vllm_version_is() compares exact strings.
    os.environ.setdefault("VLLM_VERSION", vllm.__version__.split("+")[0])
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.utils import configure_quant_config
    from vllm_ascend.ascend_config import init_ascend_config
    from vllm_ascend.utils import adapt_patch, register_ascend_customop

    # Imported before vllm-ascend patches the MoE factory: the model must still get Ascend's.
    from vllm_ernie_moe.model import Ernie4_5_MoeForCausalLM

    adapt_patch(True)  # vllm-ascend's platform patches, including the FusedMoE factory
    torch.Tensor.npu = lambda self, *args, **kwargs: self  # Ascend layers move buffers: stay on CPU
    facts: dict = {"device": device, "vllm": vllm.__version__}
    facts["quantization"] = {}
    for name, checkpoint in (("bf16", BF16), *QUANTIZED.items()):
        vllm_config = VllmConfig(model_config=ModelConfig(model=str(checkpoint), dtype="bfloat16"))
        if name != "bf16":
            quant_config = modelslim_config_class(device)(
                json.loads((checkpoint / "quant_model_description.json").read_text())
            )
            configure_quant_config(quant_config, Ernie4_5_MoeForCausalLM)
            vllm_config.quant_config = quant_config
        with set_current_vllm_config(vllm_config):
            init_single_rank()
            init_ascend_config(vllm_config)
            register_ascend_customop(vllm_config)  # stock layers -> Ascend classes, by name
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = _build(vllm_config, Ernie4_5_MoeForCausalLM)
            except Exception as error:  # noqa: BLE001  (a format vllm-ascend refuses: asserted)
                facts["quantization"][name] = {"build_error": f"{type(error).__name__}: {error}"}
                continue
            finally:
                torch.set_default_dtype(torch.float32)
            if name == "bf16":
                facts["module_classes"] = _classes(model)
                facts["routing"] = routing_facts(model, device)
            else:
                facts["quantization"][name] = quantization_facts(model, checkpoint)
            if name == "w8a8":
                facts["mixed_labels"] = mixed_label_facts(model, checkpoint)
    from vllm.model_executor.custom_op import op_registry_oot

    facts["ascend_replacements"] = {
        name: f"{cls.__module__}.{cls.__name__}" for name, cls in op_registry_oot.items()
    }
    print("CONTRACT " + json.dumps(facts))


if __name__ == "__main__":
    main()
