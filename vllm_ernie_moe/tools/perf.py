"""Performance test on vLLM with MindIE's case syntax (``modeltest ... performance``).

    python -m vllm_ernie_moe.tools.perf --model M \\
        --cases "[[2048,2048],[1024,1024],[512,512],[256,256]]" --batch-sizes 1 8 \\
        [--tp 2] [--json perf.json] [--png perf.png]

Each case is (input length, output length) at a batch size; inputs are random token ids; one
warm-up; cases run largest (input + output) first. Reported per case: end-to-end time, first-token
time (a prefill-only pass of the same batch), average non-first-token latency
((end-to-end - first token) / (output - 1)) and throughput (generated tokens / end-to-end time).
"""

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ernie_moe.tools.cli import add_engine_arguments, check_engine_arguments, command, engine


@dataclass
class CaseResult:
    input_len: int
    output_len: int
    batch_size: int
    e2e_s: float
    first_token_s: float
    non_first_token_ms: float
    throughput_tok_s: float


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``[[2048,2048],[1024,1024]]`` -> [(2048, 2048), (1024, 1024)], largest first."""
    try:
        cases = json.loads(text)
        pairs = [(int(i), int(o)) for i, o in cases]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise ValueError(f"--cases {text!r}: expected [[input_len,output_len],...]") from None
    if not pairs or any(i < 1 or o < 1 for i, o in pairs):
        raise ValueError(f"--cases {text!r}: lengths must be positive")
    return sorted(pairs, key=lambda p: p[0] + p[1], reverse=True)


_PROMPT_SEEDS = itertools.count()


def run_case(llm, input_len: int, output_len: int, batch: int, vocab: int) -> CaseResult:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def timed(tokens: int) -> float:
        # New prompts for every run: vLLM's prefix cache would serve repeated ones (or a prefix of
        # an earlier case's) and hide the prefill.
        seed = torch.Generator().manual_seed(next(_PROMPT_SEEDS))
        ids = torch.randint(10, vocab, (batch, input_len), generator=seed)
        prompts = [TokensPrompt(prompt_token_ids=row) for row in ids.tolist()]
        params = SamplingParams(
            max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0
        )
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    first = timed(1)
    e2e = timed(output_len)
    rest = (e2e - first) / (output_len - 1) * 1000 if output_len > 1 else 0.0
    return CaseResult(input_len, output_len, batch, e2e, first, rest, batch * output_len / e2e)


def print_table(results: list[CaseResult]) -> None:
    header = ("in", "out", "batch", "e2e s", "first token s", "non-first ms", "throughput tok/s")
    print("\n" + " | ".join(f"{h:>16}" for h in header))
    for r in results:
        row = (r.input_len, r.output_len, r.batch_size, f"{r.e2e_s:.3f}", f"{r.first_token_s:.3f}",
               f"{r.non_first_token_ms:.2f}", f"{r.throughput_tok_s:.1f}")  # fmt: skip
        print(" | ".join(f"{v:>16}" for v in row))


def draw_chart(results: list[CaseResult], path: Path) -> None:
    """A bar chart of throughput per case, with first-token time and per-token latency noted."""
    from PIL import Image, ImageDraw

    width, height, margin = 160 * len(results) + 120, 480, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 15), "throughput (generated tok/s) per case [in, out] x batch", fill="black")
    top = max(r.throughput_tok_s for r in results)
    base = height - margin - 40
    draw.line((margin, base, width - margin, base), fill="black")
    for k, r in enumerate(results):
        x = margin + 20 + k * 160
        bar = int((base - margin - 20) * r.throughput_tok_s / top)
        draw.rectangle((x, base - bar, x + 90, base), fill=(70, 110, 180))
        draw.text((x, base - bar - 14), f"{r.throughput_tok_s:.1f}", fill="black")
        draw.text((x, base + 6), f"[{r.input_len},{r.output_len}] x{r.batch_size}", fill="black")
        draw.text((x, base + 20), f"TTFT {r.first_token_s:.2f}s", fill="black")
        draw.text((x, base + 34), f"TPOT {r.non_first_token_ms:.0f}ms", fill="black")
    image.save(path)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_ernie_moe.tools.perf", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", default="[[2048,2048],[1024,1024],[512,512],[256,256]]")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    add_engine_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--png", type=Path, help="write a throughput chart")
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as error:
        parser.error(str(error))
    check_engine_arguments(parser, args)
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be at least 1")
    from tqdm import tqdm

    work = [(i, o, b) for i, o in cases for b in args.batch_sizes]
    with engine(
        args, max_model_len=max(i + o for i, o in cases), max_num_seqs=max(args.batch_sizes)
    ) as llm:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        run_case(llm, 16, 4, 1, vocab)  # warm-up
        results = [run_case(llm, *case, vocab) for case in tqdm(work, desc="cases", unit="case")]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.png:
        draw_chart(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
