"""Engine options shared by the project's tools (precision, perf, parity)."""

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator
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
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip torch.compile: faster start, slower run"
    )


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tp < 1:
        parser.error("--tp must be at least 1")
    if args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")


@contextmanager
def engine(args: argparse.Namespace, **overrides) -> Iterator:
    """A vLLM engine on all CPU cores (on CPU), from the shared options; overrides win.

    The engine core is shut down on leaving (see also :func:`command`)."""
    envs.use_all_cpu_cores()
    from vllm import LLM

    options = dict(
        model=args.model,
        dtype=args.dtype,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        trust_remote_code=args.trust_remote_code,
        enforce_eager=args.enforce_eager,
    )
    llm = LLM(**dict(options, **overrides))
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A tool's ``main(argv)``; called without ``argv`` (the command line: ``python -m`` or the
    console script), the process ends with its exit code and skips the interpreter's teardown.
    After an engine ran, that teardown sometimes aborted the process (SIGABRT, "terminate called
    without an active exception", vLLM 0.27.1 and 0.32, with the results already written), turning
    a passed run into a failed exit code. With ``argv`` given (in-process) it returns."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        code = main(argv)
        if argv is not None:
            return code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return wrapped
