"""The plugin is active in a fresh vLLM process through its installed entry point."""

import subprocess
import sys
from importlib.metadata import entry_points

PROBE = """
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
model = ModelRegistry.models["Ernie4_5_MoeForCausalLM"]
print(model.module_name, model.class_name)
print(getattr(CPURouter._compute_routing, "_vllm_ernie_moe_patch", False))
"""


def test_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("ernie_moe") == "vllm_ernie_moe:register"


def test_fresh_process_serves_ernie_with_the_plugin():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    lines = done.stdout.split("\n")
    assert "vllm_ernie_moe.model Ernie4_5_MoeForCausalLM" in lines
    assert "True" in lines


def test_register_is_idempotent():
    import vllm_ernie_moe

    vllm_ernie_moe.register()
    vllm_ernie_moe.register()
    from vllm import ModelRegistry

    assert ModelRegistry.models["Ernie4_5_MoeForCausalLM"].module_name == "vllm_ernie_moe.model"
