"""vLLM quantization method ``ernie-w8a8-dynamic``: msModelSlim int8 checkpoints on vLLM's kernels.

Modules: ``msmodelslim`` (the format, its description JSON and its math; torch only), ``config``
(the method vLLM registers and its per-layer dispatch), ``linear`` and ``moe`` (the methods),
``cpu_experts`` (adapters of vLLM's CPU expert kernels: version-fragile, each says what it applies
to), ``int4`` (msModelSlim int4 to the CPU kernel's layout), ``common`` (parameter helpers). Only
``register()`` imports ``config`` (not on NPUs): importing this package registers nothing.

Two modes, one method:
- a checkpoint with a msModelSlim description JSON is served as it is (picked automatically, see
  ``vllm_ernie_moe/config_hooks.py``); the description's label decides per tensor: W8A8_DYNAMIC,
  W8A16, W4A8_DYNAMIC (routed experts), W4A16 (per-group int4, any linear) or FLOAT;
- a BF16/FP16 checkpoint with ``--quantization ernie-w8a8-dynamic`` is quantized at load with
  msModelSlim's formula (``msmodelslim.quantize_rows``): the same int8 weights and scales.

Kernels are vLLM's own where they exist and are exact: oneDNN int8 scaled-mm for W8A8 linear
layers, ``CPUExpertsInt8`` for W8A8 experts, ``CPUExpertsInt4``'s INT4_W4A8 path for W4A8_DYNAMIC
experts (int4 in memory; W4A16 experts too, whose activations that kernel quantizes to int8 inside,
as vLLM's own CPU W4A16 experts do); elsewhere :mod:`vllm_ernie_moe.portable_kernels`
(docs/cpu-tiers.md). W4A16 linears run on vLLM's int4 linear (``int4_scaled_mm_cpu``,
activations int8 inside, as its experts kernel) where that is exact, else on PyTorch's int4
weight-only GEMM, and from ``portable_kernels.INT4_DEQUANTIZE_FROM_TOKENS`` tokens per step on the
model dtype's GEMM with weights dequantized per call.
vLLM has no CPU GEMM for int8 weights with unquantized activations (its CPU WNA16 kernels take
4-bit weights only). W8A16 weights stay int8 on the portable int8 weight-only GEMM where that is
the faster kernel (CPUs without AVX-512 BF16), else they are dequantized at load onto vLLM's bf16
kernels; ``VLLM_ERNIE_MOE_W8A16_INT8`` decides either way (int8: half the memory).
On Ascend NPUs vllm-ascend loads msModelSlim checkpoints itself (method ``ascend``): this method
refuses to run there rather than shadow it.
"""
