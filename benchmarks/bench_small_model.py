"""The trained small ERNIE (``vllm_ernie_moe.tools.small_model``) on held-out text, each engine in
its own process, rounds interleaved in one run:

- MTP speculative decoding: drafts accepted and bs=1 decode speed with the plugin's drafter, with
  vLLM's built-in ``ErnieMTP`` on the same weights, and without speculation: 12 held-out passages
  of 32 tokens, 48 greedy tokens each, one request at a time; the tokens must agree (lossless).
- Quantized accuracy: held-out perplexity of the bf16 model, its W8A8_DYNAMIC, W8A16 and W4A16
  (groups of 128, and of 32) quantizations (``vllm-ernie-moe-quantize``), W8A8 and W4A16 with the
  int8 lm_head, W4A16 with its activations kept in bf16 where vLLM's int4 kernels would quantize
  them (``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS=0``), W4A16 without the linears' int8 copy for
  calls of 32 rows or more (``VLLM_ERNIE_MOE_W4A16_INT8_PREFILL=0``), W4A16 on the plugin's AVX2
  int4 kernel (``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL=1``; where it serves, its prompt passes of 128
  rows or more keep bf16 activations: the ``-64-row-steps`` cases run every step below that, their
  prompts chunked, to price its int8 activations on every token), and with ``--w4a8 DIR``
  msModelSlim's W4A8_DYNAMIC of it (``MODE=w4a8 tests/fixtures/msmodelslim/recipe.sh MODEL
  DIR``). Beside each perplexity, its greedy drift: for the 12 held-out passages, how many of 48
  greedy tokens agree with the bf16 model's before the first that differs (mean).

    python benchmarks/bench_small_model.py [--model DIR] [--rounds 2] [--w4a8 DIR] [--json out.json]

``--rounds 0`` measures the perplexities only; ``--cases`` picks their rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from bench_engines import REPO, greedy_token_ids, run_child
from greedy_drift import agreeing_prefix

from vllm_ernie_moe.tools.small_model import SMALL_MODEL_DIR

SPECULATIVE = {"method": "ernie_mtp", "num_speculative_tokens": 1}
#: MTP case -> (speculative config, environment), fp32
MTP_CASES = {
    "no-spec": (None, {}),
    "plugin-mtp": (SPECULATIVE, {}),
    "vllm-mtp": (SPECULATIVE, {"VLLM_ERNIE_MOE_VLLM_MTP": "1"}),
}
AVX2_KERNEL, PORTABLE = (
    {"VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL": "1"},
    {"VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL": "0"},
)
#: Rows per engine step of the perplexity cases named ``...-64-row-steps`` (chunked prompts).
SMALL_STEP = 64
#: perplexity case -> (checkpoint, environment), bf16. The W4A16 cases without "avx2-kernel" keep
#: the AVX2 kernel off (on by default where it serves since it was measured against them).
PPL_CASES = {
    "bf16": ("bf16", {}),
    "w8a8": ("w8a8", {}),
    "w8a8-int8-head": ("w8a8", {"VLLM_ERNIE_MOE_INT8_LM_HEAD": "1"}),
    "w8a16": ("w8a16", {}),
    "w4a8": ("w4a8", {}),
    "w4a16": ("w4a16", PORTABLE),
    "w4a16-int8-head": ("w4a16", {"VLLM_ERNIE_MOE_INT8_LM_HEAD": "1", **PORTABLE}),
    "w4a16-g32": ("w4a16-g32", PORTABLE),
    # W4A16's math exactly (activations in bf16), where vLLM's int4 kernels would quantize them
    "w4a16-bf16-inputs": ("w4a16", {"VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS": "0"}),
    "w4a16-g32-bf16-inputs": ("w4a16-g32", {"VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS": "0"}),
    # the linears' calls of 32 rows or more on int4 too, without the int8 copy
    "w4a16-int4-prefill": ("w4a16", {"VLLM_ERNIE_MOE_W4A16_INT8_PREFILL": "0", **PORTABLE}),
    "w4a16-g32-int4-prefill": ("w4a16-g32", {"VLLM_ERNIE_MOE_W4A16_INT8_PREFILL": "0", **PORTABLE}),
    # the plugin's AVX2 int4 kernel (activations int8 per weight group below 128 rows per call)
    "w4a16-avx2-kernel": ("w4a16", AVX2_KERNEL),
    "w4a16-g32-avx2-kernel": ("w4a16-g32", AVX2_KERNEL),
    # the same with every step below 128 rows, so that the prompts run on the int8 path too
    f"w4a16-g32-{SMALL_STEP}-row-steps": ("w4a16-g32", PORTABLE),
    f"w4a16-g32-avx2-kernel-{SMALL_STEP}-row-steps": ("w4a16-g32", AVX2_KERNEL),
}
PPL_CHUNK = 256
PROMPTS, PROMPT_TOKENS, MAX_TOKENS = 12, 32, 48
COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
}


def held_out_prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_ernie_moe.tools.small_model import corpus

    ids = AutoTokenizer.from_pretrained(model)(corpus()[1], add_special_tokens=False).input_ids
    stride = len(ids) // PROMPTS
    return [ids[i * stride : i * stride + PROMPT_TOKENS] for i in range(PROMPTS)]


def perplexity_worker(model: str, step_rows: int | None = None) -> dict:
    """exp(mean negative log-likelihood) of the held-out text, in chunks of PPL_CHUNK tokens, and
    the greedy tokens for the held-out prompts (for the drift against bf16); with ``step_rows``,
    at most that many rows per engine step (prompts in chunks)."""
    import math

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_ernie_moe.tools.small_model import corpus

    ids = AutoTokenizer.from_pretrained(model)(corpus()[1], add_special_tokens=False).input_ids
    chunks = [ids[i : i + PPL_CHUNK] for i in range(0, len(ids) - PPL_CHUNK, PPL_CHUNK)]
    steps = dict(max_num_batched_tokens=step_rows, max_num_seqs=step_rows) if step_rows else {}
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0, **steps)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks], params)
    greedy = greedy_token_ids(llm, held_out_prompts(model), MAX_TOKENS)
    llm.llm_engine.engine_core.shutdown()  # before exit: teardown at exit can abort the process
    nll = [
        -step[token].logprob
        for chunk, out in zip(chunks, outputs, strict=True)
        for token, step in zip(chunk[1:], out.prompt_logprobs[1:], strict=True)
    ]
    return {
        "perplexity": math.exp(sum(nll) / len(nll)),
        "tokens": len(nll),
        "greedy_token_ids": greedy,
    }


def mtp_worker(model: str, case: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    speculative, _ = MTP_CASES[case]
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        speculative_config=speculative,
        disable_log_stats=False,
        seed=0,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in held_out_prompts(model)]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    before = counters(llm)
    started = time.perf_counter()
    outputs = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    seconds = time.perf_counter() - started
    after = counters(llm)
    result = {name: after[name] - before[name] for name in after}
    result |= {
        "tokens_per_s": PROMPTS * MAX_TOKENS / seconds,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }
    return result


def counters(llm) -> dict[str, int]:
    values = dict.fromkeys(COUNTERS.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            values[COUNTERS[metric.name]] = int(metric.value)
    return values


def mtp_table(rounds: list[dict]) -> list[str]:
    lines = [
        "| round | drafter | drafts accepted | tokens per step | tok/s (bs=1) | vs no-spec |",
        "|---|---|---|---|---|---|",
    ]
    for i, results in enumerate(rounds, 1):
        base = results["no-spec"]
        for case, r in results.items():
            accepted = (
                f"{r['accepted']}/{r['draft_tokens']} ({r['accepted'] / r['draft_tokens']:.0%})"
                if r["draft_tokens"]
                else "-"
            )
            per_step = f"{1 + r['accepted'] / r['drafts']:.2f}" if r["drafts"] else "1"
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            note = "" if r["token_ids"] == base["token_ids"] else " (tokens differ!)"
            lines.append(
                f"| {i} | {case} | {accepted} | {per_step} | {r['tokens_per_s']:.1f} | "
                f"{ratio:.2f}{note} |"
            )
    return lines


def ppl_table(results: dict) -> list[str]:
    base, reference = results["bf16"]["perplexity"], results["bf16"]["greedy_token_ids"]
    lines = [
        f"| weights | held-out perplexity | vs bf16 | greedy tokens as bf16's (mean of {PROMPTS} "
        f"prompts, of {MAX_TOKENS}) |",
        "|---|---|---|---|",
    ]
    for case, r in results.items():
        prefixes = map(agreeing_prefix, r["greedy_token_ids"], reference)
        lines.append(
            f"| {case} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} | "
            f"{statistics.mean(prefixes):.1f} |"
        )
    lines.append(f"\n{results['bf16']['tokens']} held-out tokens, chunks of {PPL_CHUNK}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SMALL_MODEL_DIR)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "small-model")
    parser.add_argument("--w4a8", type=Path, help="msModelSlim's W4A8_DYNAMIC of --model")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--cases", nargs="+", choices=PPL_CASES, default=list(PPL_CASES), help="perplexity rows"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("TASK", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:  # one engine in this process; its result to OUT
        task, model, out = args.child
        if task.startswith("perplexity"):
            result = perplexity_worker(model, int(task.split("-")[1]) if "-" in task else None)
        else:
            result = mtp_worker(model, task)
        Path(out).write_text(json.dumps(result))
        # The result is written: leave without the interpreter's teardown, where vLLM's CPU
        # engine now and then aborts ("terminate called without an active exception").
        os._exit(0)
    from vllm_ernie_moe.tools.quantize import FORMATS, quantize_checkpoint

    model, cache = args.model.resolve(), args.cache
    cache.mkdir(parents=True, exist_ok=True)
    checkpoints = {"bf16": model, "w4a8": args.w4a8}
    quantized = (
        ("w8a8", "w8a8-dynamic", 0),
        ("w8a16", "w8a16", 0),
        ("w4a16", "w4a16", 128),
        ("w4a16-g32", "w4a16", 32),
    )
    for name, fmt, group_size in quantized:
        checkpoints[name] = cache / name
        shutil.rmtree(checkpoints[name], ignore_errors=True)  # anew: the model may have changed
        quantize_checkpoint(model, checkpoints[name], label=FORMATS[fmt], group_size=group_size)
    rounds = [
        {
            case: run_child(__file__, case, model, cache / f"{case}-{i}.json", env)
            for case, (_, env) in MTP_CASES.items()
        }
        for i in range(args.rounds)
    ]
    perplexity = {
        case: run_child(
            __file__,
            f"perplexity-{SMALL_STEP}" if case.endswith("-row-steps") else "perplexity",
            checkpoints[name],
            cache / f"ppl-{case}.json",
            env,
        )
        for case, (name, env) in PPL_CASES.items()
        if checkpoints[name] is not None and case in args.cases
    }
    print("\n".join((mtp_table(rounds) + [""] if rounds else []) + ppl_table(perplexity)))
    if args.json:
        args.json.write_text(json.dumps({"mtp": rounds, "perplexity": perplexity}, indent=2))


if __name__ == "__main__":
    main()
