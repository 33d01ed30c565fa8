"""Where a decode step spends its time: wall time per part of the model, from forward hooks.

Runs one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on all cores and decodes
``--steps`` tokens for ``--batch`` sequences of ``--context`` random prompt tokens, twice:

- eager (``enforce_eager``): every module runs as Python, so hooks on the attention projections,
  the attention kernel, the router, routed and shared experts, norms, lm_head and sampler time
  each part; the rest of the step is engine work (scheduler, input preparation, output handling);
- compiled (vLLM's default): the decoder layers run as one torch.compile graph, so only the whole
  forward, lm_head and sampler are timed apart from the rest.

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


def profile(args, eager: bool) -> None:
    from vllm import LLM

    llm = LLM(
        model=args.checkpoint,
        dtype="bfloat16",
        max_model_len=args.context + args.steps + 16,
        max_num_seqs=max(args.batch, 1),
        enforce_eager=eager,
        compilation_config={"mode": 0} if eager else None,  # 0: no torch.compile
    )
    runner = engine_runner(llm)
    if eager:
        modules = list(matching(runner.model, PARTS))
    else:  # hooks inside the compiled graph would break it: time the whole forward instead
        modules = [(runner.model, "forward: layers (compiled graph)")]
        modules += matching(runner.model, {"logits_processor": PARTS["logits_processor"]})
    timer = PartTimer([*modules, (runner.sampler, "sampler")])
    prompts = random_prompts(args.batch, args.context, 100000, seed=0)

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
    print(
        f"\n== {'eager' if eager else 'compiled'}: batch {args.batch}, context {args.context}, "
        f"{steps} decode steps =="
    )
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
