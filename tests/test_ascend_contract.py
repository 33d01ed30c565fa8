"""The Ascend contract, checked with vllm-ascend's own code on CPU (``ascend_contract_probe.py``).

Needs a vllm-ascend source tree: ``VLLM_ERNIE_MOE_ASCEND_SRC=/path/to/vllm-ascend`` (skipped
without one), and the vLLM it pairs with (its ``.github/vllm-release-tag.commit``; skipped on
another). Checked: every layer of the model is swapped for an Ascend class by name or is on
:data:`STAYS_STOCK`; the router vllm-ascend picks for ERNIE and what it passes to the fused gating
kernel (A2/A3) or computes (310P: ``tests/test_patch_ascend_grouped_topk_router.py``); the
msModelSlim method per layer; the real msModelSlim fixtures' tensors in the parameters vllm-ascend's
W8A8_DYNAMIC and W4A8_DYNAMIC methods create, every parameter, bit for bit after vllm-ascend's
dtype cast; which formats vllm-ascend itself refuses for ERNIE (W8A16 experts; msModelSlim's W4A16,
whose linears it has no scheme for; on 310P W4A8 too).
"""

import json

import pytest
from ascend_contract_probe import QUANTIZED, ROUTING_BIAS

#: Module classes of the model that vllm-ascend does not replace, and why that is right.
STAYS_STOCK = {
    # The plugin's containers: they only call the layers below.
    "Ernie4_5_MoeForCausalLM": "container",
    "ErnieModel": "container",
    "ErnieDecoderLayer": "container",
    "ErnieAttention": "container",
    "ErnieMLP": "container (dense MLP, shared experts)",
    "ErnieMoE": "container",
    "ModuleList": "container",
    "SharedExperts": "vLLM's wrapper that runs ErnieMLP inside the MoE runner",
    "Attention": "not a CustomOp: the attention backend comes from the NPU platform",
    "GateLinear": "fp32 router GEMM; vllm-ascend replaces it only for DeepSeek MLA models",
}


def test_every_layer_is_an_ascend_class_or_deliberately_stock(contract):
    classes = set(contract["module_classes"])
    stock = {c for c in classes if not c.startswith("Ascend")}
    assert stock <= set(STAYS_STOCK), f"not replaced by vllm-ascend: {stock - set(STAYS_STOCK)}"
    replaced = {r.rsplit(".", 1)[1] for r in contract["ascend_replacements"].values()}
    assert classes - stock <= replaced
    for layer in ("QKVParallelLinear", "RMSNorm", "RotaryEmbedding", "MoERunner", "RoutedExperts"):
        assert layer in contract["ascend_replacements"], layer
    assert any(c.startswith("AscendRoutedExperts") for c in classes)


def test_router_gets_ernie_settings_and_the_models_fp32_bias(contract):
    routing = contract["routing"]
    assert routing["scoring_func"] == "softmax" and routing["renormalize"]
    assert not routing["use_grouped_topk"] and not routing["custom_routing_function"]
    assert routing["bias_dtype"] == "torch.float32" and routing["bias_is_the_models"]
    # The MoE factory was looked up when the layer was built, after vllm-ascend replaced it.
    assert routing["router_class"].startswith("Ascend")


def test_a2_routes_through_the_fused_gating_kernel_with_ernie_rule(contract):
    if contract["device"] == "_310P":
        pytest.skip("310P has no fused gating kernel")
    routing = contract["routing"]
    assert routing["router_class"] == "AscendFusedTopKRouter" and routing["fused_gating_supported"]
    call = routing["fused_call"]
    # softmax (norm_type 0), renormalised, one group (no grouped top-k), the bias in fp32: the
    # kernel then chooses by softmax + bias and gathers the unbiased softmax.
    assert call["norm_type"] == 0 and call["renorm"] == 1
    assert call["group_count"] == 1 and call["k_group"] == 1 and call["k"] == 2
    assert call["routed_scaling_factor"] == 1.0
    assert call["bias_opt"] == ROUTING_BIAS and call["bias_dtype"] == "torch.float32"


#: vllm-ascend's scheme per msModelSlim label: (linear layers, routed experts).
ASCEND_SCHEMES = {
    "W8A8_DYNAMIC": ("AscendW8A8DynamicLinearMethod", "AscendW8A8DynamicFusedMoEMethod"),
    "W4A8_DYNAMIC": (None, "AscendW4A8DynamicFusedMoEMethod"),
    "FLOAT": (None, None),
}
#: What vllm-ascend refuses when it builds the model, per device: (fixture, its error).
#: msModelSlim's W4A16 labels every linear; vllm-ascend registers W4A16 for MoE layers only, in
#: LLM-Compressor's packed layout (docs/notes/w4a16-format.md).
REFUSED_BY_ASCEND = {
    "A2": {
        "w8a16": "quant_type=W8A16 for layer_type=moe",
        "w4a16": "quant_type=W4A16 for layer_type=linear",
    },
    "_310P": {
        "w8a16": "quant_type=W8A16 for layer_type=linear",
        "w4a8": "quant_type=W4A8_DYNAMIC for layer_type=moe",
        "w4a16": "quant_type=W4A16 for layer_type=linear",
    },
}


def _served(contract) -> list[str]:
    return [n for n in QUANTIZED if n not in REFUSED_BY_ASCEND[contract["device"]]]


def test_vllm_ascend_refuses_what_it_has_no_scheme_for(contract):
    refused = REFUSED_BY_ASCEND[contract["device"]]
    for name, facts in contract["quantization"].items():
        error = facts.get("build_error")
        if name in refused:
            assert error and error.startswith("NotImplementedError") and refused[name] in error
        else:
            assert error is None, f"{name}: {error}"


def test_msmodelslim_method_for_every_layer(contract):
    for fixture in _served(contract):
        methods = contract["quantization"][fixture]["methods"]
        description = json.loads((QUANTIZED[fixture] / "quant_model_description.json").read_text())
        for prefix, (method, scheme) in methods.items():
            if prefix.endswith(".experts.routed_experts"):
                label = description[prefix.replace("routed_experts", "0.gate_proj.weight")]
                want = ASCEND_SCHEMES[label][1]
            elif prefix.endswith(".mlp.gate") or prefix in ("lm_head", "model.embed_tokens"):
                want = None  # router (no quant config), embedding and lm_head: FLOAT
            else:
                parent, _, name = prefix.rpartition(".")
                first = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}.get(name, name)
                want = ASCEND_SCHEMES[description[f"{parent}.{first}.weight"]][0]
            scheme = scheme.removesuffix("310") if scheme else None  # 310P: its own classes
            assert scheme == want, f"{fixture} {prefix}: {method}/{scheme}, want {want}"
        moe_schemes = [s.removesuffix("310") for _, s in methods.values() if s and "MoEMethod" in s]
        assert len(moe_schemes) == 2 and all(s.startswith("AscendW") for s in moe_schemes)


def test_fixture_tensors_fill_every_ascend_parameter(contract):
    """int8 weights (two int4 per int8 for W4A8) bit-exact; fp32 scales and W4A8's scale_bias as
    vllm-ascend stores them (W8A8 scales in the model dtype on A2/A3)."""
    for fixture in _served(contract):
        values = contract["quantization"][fixture]["values"]
        parameters = contract["quantization"][fixture]["parameters"]
        assert [name for name, ok in values.items() if ok is False] == [], fixture
        without_tensor = {name for name, ok in values.items() if ok is None}
        if contract["device"] == "_310P":
            # 310P's W8A8_DYNAMIC linear scheme inherits the static scheme's activation scale and
            # offset parameters; its apply() quantizes activations dynamically, never reads them.
            assert without_tensor and all(
                name.endswith((".input_scale", ".input_offset")) for name in without_tensor
            )
        else:
            assert without_tensor == set(), fixture
        shape, dtype = parameters["model.layers.1.mlp.experts.routed_experts.w13_weight"]
        # W4A8: [E, 2 x moe_intermediate_size / 2, hidden] packed; W8A8: [E, 2 x 64, hidden].
        assert dtype == "torch.int8" and shape == [8, 64 if fixture == "w4a8" else 128, 64]
        scale_dtype = parameters["model.layers.0.self_attn.qkv_proj.weight_scale"][1]
        on_310p = contract["device"] == "_310P"
        assert scale_dtype == ("torch.float32" if on_310p else "torch.bfloat16")
    if "w4a8" in _served(contract):
        parameters = contract["quantization"]["w4a8"]["parameters"]
        assert parameters["model.layers.1.mlp.experts.routed_experts.w2_scale_bias"] == [
            [8, 64, 16],
            "torch.float32",
        ]


def test_mixed_expert_labels_pass_vllm_ascend_but_not_the_plugin(contract):
    mixed = contract["mixed_labels"]
    assert mixed["ascend_quant_type"] == "W8A8_DYNAMIC"  # it reads expert 0 only
    assert mixed["plugin_error"] and "model.layers.1.mlp.experts" in mixed["plugin_error"]
