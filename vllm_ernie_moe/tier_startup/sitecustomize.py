"""Run by Python at the start of every process whose PYTHONPATH holds this folder, which
``vllm_ernie_moe.cpu_tier.environment`` puts there: vLLM loads its kernel library before it loads
plugins in its engine processes, so the tier must be forced at interpreter start.

Python reports an exception raised here ("Error in sitecustomize") and runs the program anyway, so
a refused tier ends the process itself: on a real AVX2 host a process asked to run as AVX-512 went
on, found by tests/test_cpu_tier.py."""

import os
import sys

from vllm_ernie_moe import cpu_tier

try:
    cpu_tier.force()
except cpu_tier.CPUTierError as error:
    print(error, file=sys.stderr, flush=True)
    os._exit(1)
