"""Run by Python at the start of every process whose PYTHONPATH holds this folder, which
``vllm_ernie_moe.cpu_tier.environment`` puts there: vLLM loads its kernel library before it loads
plugins in its engine processes, so the tier must be forced at interpreter start."""

from vllm_ernie_moe import cpu_tier

cpu_tier.force()
