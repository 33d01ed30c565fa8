"""patch_ernie_mtp_layer_count: an undeclared MTP head counts as 0 layers in vLLM's convertor."""

import importlib
from types import SimpleNamespace

from vllm_ernie_moe.patches import patch_ernie_mtp_layer_count as patch

patch.apply()  # imports the convertor the way vLLM does
convertor = getattr(importlib.import_module(patch.CONVERTOR_MODULE), patch.CONVERTOR)


def layers(declared) -> object:
    config = SimpleNamespace(hf_text_config=SimpleNamespace(num_nextn_predict_layers=declared))
    return convertor.get_num_hidden_layers(config)


def test_unpatched_vllm_reads_a_null_head_as_none():
    """The bug the patch exists for; when this fails, upstream fixed it: narrow the patch."""
    original = getattr(
        convertor.get_num_hidden_layers, "__wrapped__", convertor.get_num_hidden_layers
    )
    assert (
        original(SimpleNamespace(hf_text_config=SimpleNamespace(num_nextn_predict_layers=None)))
        is None
    )


def test_patched_counts_null_as_zero_and_keeps_declared_heads():
    assert patch.apply() is True
    assert patch.apply() is True  # idempotent
    assert layers(None) == 0
    assert layers(1) == 1
    assert convertor.get_num_hidden_layers(SimpleNamespace(hf_text_config=SimpleNamespace())) == 0
