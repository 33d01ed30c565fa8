"""Where a decode step spends its time: wall time per part of the model, and how close the weight
streaming comes to this minute's memory bandwidth.

Runs one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on all cores and decodes
``--steps`` tokens for ``--batch`` sequences of ``--context`` random prompt tokens, twice:

- eager (``enforce_eager``): every module runs as Python, so hooks on the attention projections,
  the attention kernel, the router, routed and shared experts, norms, lm_head and sampler time
  each part; the rest of the step is engine work (scheduler, input preparation, output handling);
- compiled (vLLM's default): hooks inside the compiled graph would break it, so torch's profiler
  times every operator instead (a one-token run subtracted: decode steps only). The weight kernels
  (lm_head, routed experts, the other linears) get the weight bytes a token reads from them and
  the rate they streamed at; everything else is attention, other operators, and time in no
  operator at all (Python, scheduler, sampling glue). The bound is measured in the same process
  right before and after: vLLM's GEMV kernels and a plain read streaming weights 8x the L3 size
  (``roofline.py``); bound = weight bytes per step / the best of those rates.

    python benchmarks/profile_decode.py --checkpoint benchmarks/out/21b-4layers-w8a8 --batch 1

Hooks cost a few microseconds each; the printed "hooks off" step time shows how many.
"""

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict

from bench_engines import REPO, random_prompts, timed_vllm_generate
from roofline import measure_bandwidth

# Module name suffix -> part of the step.
PARTS = {
    "self_attn.qkv_proj": "attention projections",
    "self_attn.o_proj": "attention projections",
    "self_attn.rotary_emb": "rotary",
    "self_attn.attn": "attention kernel",
    "mlp.gate": "router (gate GEMM)",
    "mlp.experts": "routed experts (incl. routing)",
    "mlp.shared_experts": "shared experts",
    "mlp.gate_up_proj": "dense MLP (layer 0)",
    "mlp.down_proj": "dense MLP (layer 0)",
    "input_layernorm": "norms",
    "post_attention_layernorm": "norms",
    "model.norm": "norms",
    "model.embed_tokens": "embedding",
    "logits_processor": "lm_head (logits)",
}


class PartTimer:
    """Forward pre/post hooks that add each module's own wall time to its part. A part that runs
    inside another (FusedMoE runs the shared experts) is subtracted from the outer one."""

    def __init__(self, modules) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        self.open: list[list] = []  # [start, seconds spent in nested parts]
        for module, part in modules:
            self._hook(module, part)

    def _hook(self, module, part: str) -> None:
        def pre(*_):
            self.open.append([time.perf_counter(), 0.0])

        def post(*_):
            start, nested = self.open.pop()
            elapsed = time.perf_counter() - start
            if self.open:
                self.open[-1][1] += elapsed
            if self.enabled:
                self.seconds[part] += elapsed - nested

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def engine_runner(llm):
    """The model runner of an in-process engine (uniprocess executor)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def matching(model, parts: dict[str, str]):
    """(module, part) for every module of ``model`` whose name ends with a key of ``parts``."""
    for name, module in model.named_modules():
        part = next((p for suffix, p in parts.items() if name.endswith(suffix)), None)
        if part is not None:
            yield module, part


# Operator name fragments -> part of a compiled step (first match wins; the lm_head is told apart
# from the other weight kernels by the vocabulary in its operand shapes).
WEIGHT_KERNELS = ("weight_packed_linear", "int8_scaled_mm", "onednn_mm", "onednn_scaled_mm",
                  "int4_scaled_mm", "weight_int4pack_mm", "weight_int8pack_mm")  # fmt: skip
EXPERT_KERNELS = ("fused_experts", "cpu_fused_moe")
ATTENTION_OPS = ("attention", "kv_cache", "reshape_and_cache", "scheduler_metadata")


def streamed_bytes(model) -> dict[str, float]:
    """Weight bytes one decoded token reads, by part: the lm_head, the routed experts (top_k of
    each layer's experts) and every other weight (linears, router, norms). The embedding reads
    one row: left out; a tied lm_head is counted once, as the lm_head."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    parts: dict[str, float] = defaultdict(float)
    for module in model.modules():
        size = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        if isinstance(module, ParallelLMHead):
            parts["lm_head"] += size
        elif isinstance(module, VocabParallelEmbedding):
            continue
        elif hasattr(module, "w13_weight"):  # routed experts
            parts["routed experts"] += size * module.top_k / module.global_num_experts
        elif isinstance(module, LinearBase) and module.weight.numel() == 0:
            # vLLM's CPU bf16 GEMMs keep their packed weight outside the module: logical size
            rows = sum(module.output_partition_sizes)
            columns = getattr(module, "input_size_per_partition", module.input_size)
            parts["other weight kernels"] += rows * columns * module.params_dtype.itemsize
        else:
            parts["other weight kernels"] += size
    return parts


def operator_part(name: str, shapes: str, vocab: int) -> str:
    if any(k in name for k in EXPERT_KERNELS):
        return "routed experts"
    if any(k in name for k in WEIGHT_KERNELS):
        return "lm_head" if str(vocab) in shapes else "other weight kernels"
    if any(k in name for k in ATTENTION_OPS):
        return "attention"
    return "other operators"


def operator_seconds(run, vocab: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """Wall time of ``run()``, self time per part and per operator, from torch's profiler."""
    import torch

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        wall = run()
    parts: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        shapes = str(event.input_shapes)
        parts[operator_part(event.key, shapes, vocab)] += seconds
        ops[event.key] += seconds
    return wall, parts, ops


def profile_compiled(llm, prompts, args) -> None:
    runner = engine_runner(llm)
    vocab = runner.model.config.vocab_size
    weights = streamed_bytes(runner.model)

    def run(tokens: int) -> float:
        return timed_vllm_generate(llm, prompts, tokens)

    run(4)  # warm-up
    before = measure_bandwidth(runner.model.config.hidden_size)
    prefill, prefill_parts, prefill_ops = operator_seconds(lambda: run(1), vocab)
    total, parts, ops = operator_seconds(lambda: run(args.steps), vocab)
    after = measure_bandwidth(runner.model.config.hidden_size)
    steps = args.steps - 1
    step = (total - prefill) / steps
    parts = {k: (v - prefill_parts.get(k, 0.0)) / steps for k, v in parts.items()}
    ops = {k: (v - prefill_ops.get(k, 0.0)) / steps for k, v in ops.items()}
    parts["outside any operator (Python, scheduler, glue)"] = step - sum(parts.values())
    rate = max(*before.values(), *after.values())
    streamed = sum(weights.values())  # one token's: larger batches read more experts
    print(f"\n== compiled: batch {args.batch}, context {args.context}, {steps} decode steps ==")
    print(f"step {1000 * step:.2f} ms ({args.batch / step:.1f} tok/s); streaming probe GB/s:")
    for kernel in before:
        print(f"  {kernel}: {before[kernel]:.1f} before, {after[kernel]:.1f} after")
    print("| part | ms / step | share | weight MB / step | GB/s |\n|---|---|---|---|---|")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        size = weights.get(part)
        cells = f"{size / 1e6:.0f} | {size / seconds / 1e9:.1f}" if size else "- | -"
        print(f"| {part} | {1000 * seconds:.2f} | {100 * seconds / step:.0f}% | {cells} |")
    bound = streamed / (rate * 1e9)
    print(
        f"| **step** | **{1000 * step:.2f}** | | {streamed / 1e6:.0f} | "
        f"{streamed / step / 1e9:.1f} |"
    )
    lower = " (batch > 1 reads more experts: a lower bound)" if args.batch > 1 else ""
    print(
        f"bound (weight bytes / {rate:.1f} GB/s): {1000 * bound:.2f} ms{lower}; "
        f"the step runs at {bound / step:.2f} of it"
    )
    print("\ntop operators (ms / step):")
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {1000 * seconds:7.3f}  {name}")


def profile_prefill(llm, args) -> None:
    """One new ``--prefill``-token prompt under the profiler; bound = its multiply-adds at the
    best GEMM rate vLLM's kernels reach at 1024 rows on the model's shapes, measured right after
    (int8 kernels for a quantized model: the int4 experts kernel is not in the probe)."""
    import torch
    from roofline import PREFILL_BATCH, active_parameters, rates_by_shape

    runner = engine_runner(llm)
    config = runner.model.config.to_dict()
    int8 = any(p.dtype == torch.int8 for p in runner.model.parameters())
    timed_vllm_generate(llm, random_prompts(1, args.prefill, 100000, seed=1), 1)  # warm-up
    prompt = random_prompts(1, args.prefill, 100000, seed=2)  # new: not in the prefix cache
    wall, parts, ops = operator_seconds(
        lambda: timed_vllm_generate(llm, prompt, 1), config["vocab_size"]
    )
    parts["outside any operator (Python, scheduler, glue)"] = wall - sum(parts.values())
    active = active_parameters(config)
    tera_ops = 2 * (active["layers"] * args.prefill + active["lm_head"]) / 1e12
    rows = rates_by_shape(config, batches=(PREFILL_BATCH,))
    kernels = ("sgl int8", "oneDNN int8") if int8 else ("sgl bf16", "oneDNN bf16")
    peak = max(r[k] for r in rows for k in kernels) * 2 * PREFILL_BATCH / (1 if int8 else 2) / 1e3
    print(
        f"\n== prefill of {args.prefill} tokens: {wall:.2f} s ({args.prefill / wall:.0f} tok/s) =="
    )
    print("| part | s | share |\n|---|---|---|")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {seconds:.3f} | {100 * seconds / wall:.0f}% |")
    bound = tera_ops / peak
    print(
        f"bound ({tera_ops:.2f} TOP at the {'int8' if int8 else 'bf16'} GEMM peak {peak:.2f} "
        f"TOP/s): {bound:.2f} s; the prefill runs at {bound / wall:.2f} of it"
    )
    print("\ntop operators (s):")
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {seconds:7.3f}  {name}")


def profile(args, eager: bool) -> None:
    from vllm import LLM

    llm = LLM(
        model=args.checkpoint,
        dtype="bfloat16",
        max_model_len=max(args.context + args.steps, args.prefill) + 16,
        max_num_seqs=max(args.batch, 1),
        enforce_eager=eager,
        compilation_config={"mode": 0} if eager else None,  # 0: no torch.compile
    )
    prompts = random_prompts(args.batch, args.context, 100000, seed=0)
    if not eager:
        profile_compiled(llm, prompts, args)
        if args.prefill:
            profile_prefill(llm, args)
        return
    runner = engine_runner(llm)
    timer = PartTimer([*matching(runner.model, PARTS), (runner.sampler, "sampler")])

    def run(tokens: int) -> float:
        return timed_vllm_generate(llm, prompts, tokens)

    run(4)  # warm-up
    hooks_off = min(run(args.steps) - run(1) for _ in range(2)) / (args.steps - 1)
    timer.enabled = True
    prefill = run(1)
    first = dict(timer.seconds)
    timer.seconds.clear()
    total = run(args.steps) - prefill
    steps = args.steps - 1
    seconds = {k: v - first.get(k, 0.0) for k, v in timer.seconds.items()}
    step_ms = 1000 * total / steps
    print(f"\n== eager: batch {args.batch}, context {args.context}, {steps} decode steps ==")
    print(
        f"step time {step_ms:.2f} ms with hooks, {1000 * hooks_off:.2f} ms hooks off "
        f"({args.batch / hooks_off:.1f} tok/s)"
    )
    print("| part | ms / step | share |\n|---|---|---|")
    for part, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {1000 * s / steps:.2f} | {100 * s / total:.0f}% |")
    rest = total - sum(seconds.values())
    print(
        f"| engine: scheduler, inputs, outputs, glue | {1000 * rest / steps:.2f} | "
        f"{100 * rest / total:.0f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks/out/21b-4layers-bf16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=33)
    parser.add_argument(
        "--prefill", type=int, default=0, help="compiled mode: also profile a prompt this long"
    )
    parser.add_argument("--mode", choices=["eager", "compiled", "both"], default="both")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm_ernie_moe import envs

    envs.use_all_cpu_cores()
    if args.mode == "both":  # one engine per process: vLLM's compiled model is per process
        for mode in ("eager", "compiled"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True)
    else:
        profile(args, eager=args.mode == "eager")


if __name__ == "__main__":
    main()
