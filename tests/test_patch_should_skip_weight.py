"""patch_should_skip_weight: vLLM's safetensors iterator skips, before mapping them, the tensors
the repack cache serves, and only while the model's load asks for it. The end-to-end check (a
warm engine start is served the experts and answers as the cold one) is
``tests/test_repack_cache.py::test_a_warm_start_is_served_without_the_experts_and_a_rewrite_repacks``."""

import safetensors
import torch
from safetensors.torch import save_file
from vllm.model_executor.model_loader import weight_utils

from vllm_ernie_moe.patches import patch_should_skip_weight as patch
from vllm_ernie_moe.patches.patching import is_patched, unpatched
from vllm_ernie_moe.quant import repack_cache

EXPERT = "model.layers.1.mlp.experts.0.up_proj.weight"
GATE = "model.layers.1.mlp.gate.weight"
OTHER_LAYER_EXPERT = "model.layers.2.mlp.experts.0.up_proj.weight"


def test_unpatched_iterator_asks_the_filter_before_mapping():
    """What the patch hooks; when this fails, vLLM's iterator changed: re-check the patch."""
    assert patch._asked_before_mapping(unpatched(weight_utils.should_skip_weight))


def test_applied_in_this_process():
    patch.apply()
    assert is_patched(weight_utils.should_skip_weight)


def test_served_tensors_are_never_mapped(tmp_path, monkeypatch):
    """Inside ``not_reading`` the iterator neither yields nor maps (``get_tensor``) the served
    layer's tensors; outside it, everything is read as vLLM reads it."""
    patch.apply()
    path = tmp_path / "model.safetensors"
    save_file({name: torch.full((4,), float(i)) for i, name in
               enumerate((EXPERT, GATE, OTHER_LAYER_EXPERT))}, str(path))  # fmt: skip
    mapped = []
    opened = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            mapped.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(weight_utils, "safe_open", Recording)

    def names() -> list[str]:
        return [name for name, _ in weight_utils.safetensors_weights_iterator([str(path)], False)]

    with repack_cache.not_reading(("model.layers.1.mlp.experts.",)):
        assert sorted(names()) == sorted([GATE, OTHER_LAYER_EXPERT])
    assert EXPERT not in mapped
    mapped.clear()
    assert sorted(names()) == sorted([EXPERT, GATE, OTHER_LAYER_EXPERT])
    assert EXPERT in mapped


def test_vllms_own_rule_still_applies():
    """vLLM's expert-parallel filter: another rank's expert weight is skipped as before."""
    patch.apply()
    assert weight_utils.should_skip_weight(EXPERT, {5})
    assert not weight_utils.should_skip_weight(EXPERT, {0})
    assert not weight_utils.should_skip_weight(EXPERT, None)
