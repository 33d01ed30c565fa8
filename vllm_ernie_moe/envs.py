"""Every environment variable this plugin reads, in one place."""

import os

#: Where the dialog example's default random checkpoint is built and cached.
VLLM_ERNIE_MOE_CACHE_DIR: str = os.environ.get(
    "VLLM_ERNIE_MOE_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "vllm-ernie-moe"),
)


def use_all_cpu_cores() -> None:
    """On vLLM's CPU backend, compute on every core (vLLM reserves one for its front end by default)
    and keep the KV cache small; explicit user settings win. Call before vLLM starts an engine."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
