"""Patch: bf16 linear layers on x86 CPUs without AVX-512 BF16 run PyTorch's slow bf16 GEMM.

- Target: ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which picks the
  kernel of each unquantized linear layer (and of the lm_head) on vLLM's CPU back end when the
  model is loaded: zentorch, sgl-kernel (AMX), a oneDNN handler, else ``F.linear``.
- Why: on vLLM's AVX2 tier oneDNN cannot make a bf16 handler ("could not create a primitive
  descriptor"), so every bf16 linear ends on ``F.linear``, whose bf16 GEMM there computed
  0.0085-0.0196 TOP/s at 1 to 128 tokens (a real Zen 3 host: docs/results/
  bf16-widening-avx2-zen3.json): a bf16 prefill runs at the speed of scalar code. At 128 tokens
  ``F.linear`` took 4.55-7.49x the time of this patch's widened path (same file).
- How: where oneDNN refuses bf16 and the tier has no AVX-512 BF16
  (``portable_kernels.bf16_gemm_is_slow``), bf16 2-D weights get the plugin's
  ``bf16_linear`` op: ``F.linear`` below ``BF16_WIDEN_FROM_TOKENS`` tokens (a batch-1 step reads
  the bf16 weight once, as upstream does), from there on the weight widened 256 rows at a time
  into a buffer kept for the process, each block on the fp32 GEMM while in the L2 cache. Same
  sums (fp32), output rounded to bf16 once, as before.
  Every other weight, dtype and CPU keeps upstream's choice. ``VLLM_ERNIE_MOE_BF16_WIDENING=0``
  turns it off.
- Upstream: vLLM 0.32.0 and 0.27.1 fall back to ``F.linear`` with a warning; no issue found.
- Applied when a process imports the target's module (``patching.when_imported``), where its
  probe sees the bug: ``ops.create_onednn_mm`` refuses a bf16 weight on this
  CPU (or vLLM has no oneDNN), on a tier without AVX-512 BF16, and no zentorch platform.
- Remove when: vLLM's CPU back end has a fast bf16 GEMM on AVX2 (oneDNN's bf16 on AVX2, or a
  widening path of its own).
- Test: ``tests/test_patch_cpu_unquantized_gemm.py`` (the probe, the dispatch, the op against
  float64 math on both sides of the switch); the model parity tests against transformers run
  through it on such CPUs.
"""

from __future__ import annotations

from types import ModuleType

import torch

from vllm_ernie_moe import envs, portable_kernels
from vllm_ernie_moe.patches.patching import install, when_imported

TARGET_MODULE = "vllm.model_executor.layers.utils"


def onednn_refuses_bf16() -> bool:
    """Whether vLLM's CPU linear dispatch ends on ``F.linear`` for bf16 weights here: no oneDNN,
    or its handler cannot be made for a bf16 weight on this CPU (AVX2)."""
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return True
    try:
        ops.create_onednn_mm(torch.zeros(32, 32, dtype=torch.bfloat16).t(), 32)
    except RuntimeError:
        return True
    return False


def _slow_bf16_linear_here(_original) -> bool:
    from vllm.platforms import current_platform

    return (
        not current_platform.is_zen_cpu()
        and portable_kernels.bf16_gemm_is_slow()
        and onednn_refuses_bf16()
    )


def _widening_bf16(original):
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.ndim == 2 and weight.dtype == torch.bfloat16 and not weight.is_meta:
            # Keeps the weight, as upstream's F.linear does; called as cpu_linear(x, weight, bias).
            layer.cpu_linear = torch.ops.vllm_ernie_moe.bf16_linear
            return
        original(layer, remove_weight)

    return dispatch_cpu_unquantized_gemm


def apply() -> bool:
    """Widen bf16 linears to fp32 at prefill size where the bf16 GEMM is slow; idempotent. True
    when active, or on CPU with the target's module not imported yet (it applies then: the API
    server never imports it)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not envs.bf16_widening():
        return False
    return when_imported(TARGET_MODULE, _install) is not False


def _install(utils: ModuleType) -> bool:
    return install(
        __name__, utils, "dispatch_cpu_unquantized_gemm", _widening_bf16,
        bug_present=_slow_bf16_linear_here,
        fixed=f"bf16 linears widened to fp32 from {portable_kernels.BF16_WIDEN_FROM_TOKENS} tokens",
    )  # fmt: skip
