"""Can an int4 weight kernel read faster than PyTorch's on AVX2? The 21B-A3B's W4A16 linear and
expert shapes at 1 and 8 tokens, side by side in one process, interleaved per shape:

- ``torch int4``: ``_weight_int4pack_mm_for_cpu``, bf16 activations (the plugin's W4A16 kernel
  on AVX2 below ``INT4_DEQUANTIZE_FROM_TOKENS``);
- ``AVX2 probe``: a 60-line int4 x int8 kernel (``int4_gemv_avx2.cpp``, built here with
  ``torch.utils.cpp_extension``; not part of the plugin) on activations quantized to int8 per
  group of 128 beforehand; ``AVX2 probe + quantization``, that quantization done by torch ops
  in each call; ``AVX2 probe + C++ quantization``, done by the probe's own C++ in the same call
  (the same int8 values, bit for bit: checked), what a kernel in the plugin would pay;
- ``vLLM oneDNN int8``: vLLM's W8A8 linear kernel (``onednn_scaled_mm``, per-token int8
  activations) on the int4 values stored as int8 with unit scales (its rate, and whether it is
  exact on them: AVX2 int8 GEMMs saturate on weights beyond +-64);
- ``Inductor GEMV``: the dequantize-and-dot written in torch ops, compiled by torch.compile.

And the int8 weights of the int8 lm_head: ``torch int8`` (``_weight_int8pack_mm``, the int8
head's kernel on AVX2, which gets the per-token int8 activations as bf16 integers; here bf16
activations) against ``AVX2 probe int8`` (the same source: the int8 weights widened to fp32
against fp32 activations, fp32 sums) and ``AVX2 probe int8 x int8`` (the head's W8A8 math: int8
activations per token, quantized beforehand, both sides widened to int16, ``vpmaddwd``).

Weights: random int4 values with group scales (128 inputs), ``COPIES`` copies cycling so that they
come from memory (random int8 with row scales, 2 copies, for the int8 rows). Rows: milliseconds
per call, the weight bytes' rate, the error against a float64 product with the bf16 activations
(the W4A16 product; not for oneDNN, which has no group scales) and with each int8-activation
kernel's own int8 activations (exactness).

    python benchmarks/int4_gemv_avx2.py [--rounds 2] [--tokens 1 8] [--json out.json]
"""

import json
import time
from pathlib import Path

import torch
from int4_linear import SHAPES, kernel_bench_arguments, write_kernel_results

GROUP, COPIES = 128, 8
EXPERT_SHAPES = (("expert gate_up", 2560, 3072), ("expert down", 1536, 2560))
#: int8 weights: the int8 lm_head (``VLLM_ERNIE_MOE_INT8_LM_HEAD``, 265 MB) and one linear.
INT8_SHAPES, INT8_COPIES = (("lm_head int8", 2560, 103424), ("qkv_proj int8", 2560, 3584)), 2


def build_probe():
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        raise SystemExit("int4_gemv_avx2.py: the probe kernel needs an x86 CPU with AVX2")
    from torch.utils.cpp_extension import load

    source = Path(__file__).with_suffix(".cpp")
    return load(name="int4_gemv_avx2_probe", sources=[str(source)],
                extra_cflags=["-O3", "-mavx2", "-mfma"])  # fmt: skip


def probe_layout(values: torch.Tensor) -> torch.Tensor:
    """int4 values ``[N, K]`` in [-8, 7] -> the probe's ``[N, K/2]`` bytes (see the .cpp)."""
    shifted = (values + 8).to(torch.uint8).view(values.shape[0], -1, 2, 32)
    return (shifted[:, :, 0] | (shifted[:, :, 1] << 4)).reshape(values.shape[0], -1).contiguous()


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 activations per group of ``GROUP`` (``portable_kernels.quantize_tokens``'s formula on
    each group): values, fp32 scales and each group's int sum."""
    from vllm_ernie_moe.portable_kernels import quantize_tokens

    values, scale = quantize_tokens(x.reshape(-1, GROUP))
    values = values.to(torch.int8).view(x.shape[0], -1, GROUP)
    return (values.view_as(x).contiguous(), scale.view(x.shape[0], -1),
            values.sum(-1, dtype=torch.int32))  # fmt: skip


def group_scaled(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values [R, K]`` times their per-group ``scale [R, K / GROUP]``, in their dtype."""
    rows = values.shape[0]
    return (values.view(rows, -1, GROUP) * scale[..., None]).view(rows, -1)


def int8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 lm_head's per-token int8 activations (``portable_kernels.quantize_tokens``) as
    int8 values and fp32 scales ``[M]``."""
    from vllm_ernie_moe.portable_kernels import quantize_tokens

    values, scale = quantize_tokens(x)
    return values.to(torch.int8), scale.view(-1).contiguous()


def inductor_gemv(x: torch.Tensor, probe_bytes: torch.Tensor, scale: torch.Tensor):
    """One token's product on the probe's layout in torch ops, for torch.compile."""
    rows = probe_bytes.view(probe_bytes.shape[0], -1, 32)
    low, high = (rows & 15).float() - 8, (rows >> 4).float() - 8
    chunks = x.float().view(-1, 2, 32)
    parts = (low * chunks[:, 0] + high * chunks[:, 1]).sum(-1).view(scale.shape[0], -1, 2)
    return (parts.sum(-1) * scale).sum(-1).to(x.dtype).view(1, -1)


def kernels(probe, inputs: int, outputs: int, generator) -> tuple[dict, list]:
    from vllm import _custom_ops as ops

    from vllm_ernie_moe.portable_kernels import int4_scales_and_zeros, pack_int4

    copies = []
    for _ in range(COPIES):
        values = torch.randint(-8, 8, (outputs, inputs), dtype=torch.int8, generator=generator)
        scale = torch.rand(outputs, inputs // GROUP, generator=generator) * 0.01 + 0.005
        unit = torch.ones(outputs, 1)  # the handler keeps a pointer to it
        handler = ops.create_onednn_scaled_mm(values.t(), unit, torch.float32, True, False, 32)
        copies.append(dict(values=values, scale=scale, probe=probe_layout(values),
                           torch=(pack_int4(values), int4_scales_and_zeros(scale, torch.bfloat16)),
                           onednn=(handler, unit)))  # fmt: skip
    compiled = torch.compile(inductor_gemv, dynamic=False)

    def onednn(x, _, c):
        x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x.float())
        out = torch.empty(x.shape[0], outputs)
        return ops.onednn_scaled_mm(c["onednn"][0], x_q, out, x_scale, None, None, None)

    calls = {
        "torch int4": lambda x, _, c: torch._weight_int4pack_mm_for_cpu(x, c["torch"][0], GROUP,
                                                                        c["torch"][1]),
        "AVX2 probe": lambda _, q, c: probe.int4_gemm(*q, c["probe"], c["scale"]),
        "AVX2 probe + quantization": lambda x, _, c: probe.int4_gemm(*quantize_groups(x),
                                                                     c["probe"], c["scale"]),
        "AVX2 probe + C++ quantization": lambda x, _, c: probe.int4_gemm_bf16(x, c["probe"],
                                                                              c["scale"]),
        "vLLM oneDNN int8": onednn,
        "Inductor GEMV": lambda x, _, c: compiled(x, c["probe"], c["scale"]),
    }  # fmt: skip
    return calls, copies


def timed(call, x, quantized, copies: list, calls: int) -> float:
    call(x, quantized, copies[0])
    start = time.perf_counter()
    for i in range(calls):
        call(x, quantized, copies[i % len(copies)])
    return (time.perf_counter() - start) / calls * 1e3


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).abs().max() / reference.abs().max()).item()


def int8_rows(probe, generator, tokens: int, rounds: int) -> list[dict]:
    """The int8 shapes: PyTorch's int8 weight-only kernel with bf16 activations (the int8
    lm_head's kernel, ``portable_kernels.int8_gemm``) against the probe's int8 kernel on the same
    activations in fp32; per-row scales."""
    rows = []
    for name, inputs, outputs in INT8_SHAPES:
        copies = [
            (torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8, generator=generator),
             torch.rand(outputs, generator=generator) * 0.01 + 0.005)
            for _ in range(INT8_COPIES)
        ]  # fmt: skip
        calls = {
            "torch int8": lambda x, _, c: torch._weight_int8pack_mm(x, c[0], c[1].to(x.dtype)),
            "AVX2 probe int8": lambda x, _, c: probe.int8_gemm(x.float(), c[0], c[1]),
            "AVX2 probe int8 x int8": lambda _, q, c: probe.int8_int8_gemm(*q, c[0], c[1]),
        }
        weight = copies[0][0].double() * copies[0][1].double()[:, None]
        x = torch.randn(tokens, inputs, generator=generator).bfloat16()
        reference = x.double() @ weight.t()
        quantized = int8_tokens(x)  # the int8 x int8 probe's input, made outside the timing
        own = (quantized[0].double() * quantized[1].double()[:, None]) @ weight.t()
        for round_ in range(rounds):
            for kernel, call in calls.items():
                out = call(x, quantized, copies[0])
                ms = timed(call, x, quantized, copies, 50 if tokens == 1 else 10)
                rows.append(dict(
                    shape=name, tokens=tokens, round=round_, kernel=kernel, ms=ms,
                    weight_gb_per_s=inputs * outputs / ms / 1e6,
                    error_vs_bf16_activations=relative_error(out, reference),
                    error_vs_its_int8_activations=(
                        relative_error(out, own) if "x int8" in kernel else None),
                ))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    from vllm import _custom_ops as ops

    args = kernel_bench_arguments(__doc__, (1, 8))
    probe = build_probe()
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, inputs, outputs in (*SHAPES, *EXPERT_SHAPES):
        calls, copies = kernels(probe, inputs, outputs, generator)
        weight = group_scaled(copies[0]["values"].float(), copies[0]["scale"]).double()
        for tokens in args.tokens:
            x = torch.randn(tokens, inputs, generator=generator).bfloat16()
            quantized = quantize_groups(x)  # the probe's input, made outside the timing
            in_cpp = probe.quantize_groups(x)
            assert all(torch.equal(a, b) for a, b in zip(in_cpp, quantized, strict=True))
            reference = x.double() @ weight.t()
            per_group = group_scaled(*(t.double() for t in quantized[:2]))
            per_token, token_scale, _ = ops.onednn_scaled_int8_quant(x.float())
            own = {"AVX2 probe": per_group @ weight.t(),
                   "vLLM oneDNN int8": (per_token.double() * token_scale.double())
                   @ copies[0]["values"].double().t()}  # fmt: skip
            for round_ in range(args.rounds):
                for kernel, call in calls.items():
                    if kernel == "Inductor GEMV" and tokens != 1:
                        continue
                    out = call(x, quantized, copies[0])
                    ms = timed(call, x, quantized, copies, 200 if tokens == 1 else 50)
                    results.append(dict(
                        shape=name, tokens=tokens, round=round_, kernel=kernel, ms=ms,
                        weight_gb_per_s=inputs * outputs / 2 / ms / 1e6,
                        error_vs_bf16_activations=(
                            None if "oneDNN" in kernel else relative_error(out, reference)),
                        error_vs_its_int8_activations=(
                            relative_error(out, own[kernel.split(" + ")[0]])
                            if kernel.split(" + ")[0] in own else None),
                    ))  # fmt: skip
                    print(json.dumps(results[-1]), flush=True)
    for tokens in args.tokens:
        results += int8_rows(probe, generator, tokens, args.rounds)
    write_kernel_results(args.json, results)


if __name__ == "__main__":
    main()
