"""Engine options shared by the project's tools (precision, perf, parity)."""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from vllm_ernie_moe import envs


def add_engine_arguments(parser: argparse.ArgumentParser, dtype: str = "auto") -> None:
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument(
        "--dtype", default=dtype, choices=["auto", "bfloat16", "float16", "float32"]
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--quantization", help="e.g. ernie-w8a8-dynamic for a BF16 checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true")


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tp < 1:
        parser.error("--tp must be at least 1")
    if args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")


@contextmanager
def engine(args: argparse.Namespace, **overrides) -> Iterator:
    """A vLLM engine on all CPU cores (on CPU), from the shared options; overrides win.

    The engine core is shut down on leaving: left to interpreter exit, its threads can abort the
    process ("terminate called without an active exception") after the results are written."""
    envs.use_all_cpu_cores()
    from vllm import LLM

    options = dict(
        model=args.model,
        dtype=args.dtype,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        trust_remote_code=args.trust_remote_code,
    )
    llm = LLM(**dict(options, **overrides))
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
