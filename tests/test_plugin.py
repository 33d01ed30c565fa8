"""The plugin is active in a fresh vLLM process through its installed entry point."""

import subprocess
import sys
from importlib.metadata import entry_points

PROBE = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import importlib
from vllm import ModelRegistry
from vllm_ernie_moe import compat
model = ModelRegistry.models["Ernie4_5_MoeForCausalLM"]
print(model.module_name, model.class_name)
router = compat.cpu_router_class()
routing = (
    router._compute_routing
    if router is not None
    else importlib.import_module(compat.CPU_SELECT_EXPERTS_MODULE).select_experts
)
print(getattr(routing, "_vllm_ernie_moe_patch", False))
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


REFUSAL = """
import vllm
vllm.__version__ = "0.23.0"  # what vllm-ascend's registry release 0.23.0.post1 pairs with
import vllm_ernie_moe
vllm_ernie_moe.register()
"""


def test_an_older_vllm_is_refused_with_the_range_and_the_fix():
    done = subprocess.run([sys.executable, "-c", REFUSAL], capture_output=True, text=True)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "UnsupportedVLLMError: vLLM 0.23.0 is too old" in last
    assert "0.27.1 to 0.33" in last and "vllm-ascend" in last


def test_the_supported_vllm_versions_are_accepted():
    from packaging.version import Version

    from vllm_ernie_moe import compat

    for version in ("0.27.1", "0.32.0", "0.33.0"):
        assert Version(version) in compat.SUPPORTED_VLLM and Version(version) in compat.TESTED_VLLM
    assert Version("0.23.0") not in compat.SUPPORTED_VLLM


USER_TOOLS = ("quantize", "precision", "perf", "parity", "soak")


def test_user_tools_answer_under_every_name():
    """Console scripts, tools.<name>, and the pre-move `python -m vllm_ernie_moe.<name>` alias."""
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    for name in USER_TOOLS:
        assert scripts[f"vllm-ernie-moe-{name}"] == f"vllm_ernie_moe.tools.{name}:main"
        for module in (f"vllm_ernie_moe.tools.{name}", f"vllm_ernie_moe.{name}"):
            done = subprocess.run(
                [sys.executable, "-m", module, "--help"], capture_output=True, text=True
            )
            assert done.returncode == 0 and done.stdout.startswith("usage:"), (module, done.stderr)
