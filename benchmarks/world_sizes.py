"""The seed's world sizes on vLLM's CPU backend, each checked against transformers: a 21B-A3B-like
geometry at TP 1, 2, 4 and 8 (one node) and TP 8 as 4 + 4, a 300B-A47B-like one at world size 16
as 8 + 8, the msModelSlim W8A8 fixture and a bf16 checkpoint at TP 4 as 2 + 2. Every run is
started by ``examples/multinode.sh`` (``NNODES=1`` for one node); two nodes are two network
namespaces joined by a veth pair (loopback where they cannot be made). Per run: seconds from
start to a healthy API, resident memory of each rank's process, and the parity verdict.

    python benchmarks/world_sizes.py [--runs NAME ...] [--json docs/results/world-sizes.json]

fp32: greedy tokens equal and top-5 logprobs within 1e-3 of transformers fp32; bf16 and W8A8:
vLLM's closeness rule and the bf16 drift bounds of ``tests/reference.py`` (W8A8 against the
fake-quant reference). Exit code 1 when any run fails its check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_engines import machine  # noqa: E402
from reference import (  # noqa: E402
    Generation,
    assert_bf16_drift,
    check_logprobs_close,
    dequantized_checkpoint,
    fake_quantize_activations,
    logprob_drift,
    prompt_token_ids,
    transformers_greedy,
)
from two_hosts import SMALL_ENGINE, healthy, served_greedy, start_node, two_hosts  # noqa: E402

from vllm_ernie_moe.tools.quantize import quantize_checkpoint  # noqa: E402
from vllm_ernie_moe.tools.random_checkpoint import build_checkpoint  # noqa: E402
from vllm_ernie_moe.tools.served import free_port, stop, wait_until_healthy  # noqa: E402

MAX_TOKENS, TOP_K = 12, 5
FP32_TOLERANCE = 1e-3
W8A8_FIXTURE = ROOT / "tests" / "fixtures" / "ernie-tiny-w8a8-msmodelslim"
START_TIMEOUT = 900


@dataclass(frozen=True)
class Run:
    name: str
    checkpoint: str  # a geometry of random_checkpoint.py, or a key of QUANTIZED
    dtype: str
    tp: int
    nodes: int


#: W8A8_DYNAMIC checkpoints: msModelSlim's own fixture (64 expert columns: TP 2 at most, vLLM's
#: int8 CPU experts need 32 per rank), and the offline tool's output for the 21B-like geometry
#: with 128 expert columns (TP 4).
QUANTIZED = {"w8a8-fixture": None, "w8a8-21b": ("tp8-21b", {"moe_intermediate_size": 128})}


RUNS = [
    Run("21b-tp1", "tp8-21b", "float32", 1, 1),
    Run("21b-tp2", "tp8-21b", "float32", 2, 1),
    Run("21b-tp4", "tp8-21b", "float32", 4, 1),
    Run("21b-tp8", "tp8-21b", "float32", 8, 1),
    Run("21b-tp8-2nodes", "tp8-21b", "float32", 8, 2),
    Run("21b-bf16-tp4-2nodes", "tp8-21b", "bfloat16", 4, 2),
    Run("w8a8-fixture-tp2-2nodes", "w8a8-fixture", "bfloat16", 2, 2),
    Run("w8a8-tp4-2nodes", "w8a8-21b", "bfloat16", 4, 2),
    Run("300b-ws16-2nodes", "ws16-300b", "float32", 16, 2),
]


@dataclass
class Result:
    run: Run
    start_seconds: float | None = None
    rank_rss_mb: dict[str, float] = field(default_factory=dict)  # process title -> MB
    node_rss_mb: list[float] = field(default_factory=list)  # every process of each node
    greedy_equal: bool | None = None
    max_logprob_diff: float | None = None
    passed: bool = False
    error: str = ""


def node_memory(process: subprocess.Popen) -> tuple[dict[str, float], float]:
    """Resident MB of each vLLM worker under a node's process, and of the whole node."""
    root = psutil.Process(process.pid)
    ranks, total = {}, 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            rss = p.memory_info().rss / 2**20
            title = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        total += rss
        if title.startswith("VLLM::Worker"):
            ranks[title] = round(rss)
    return ranks, round(total)


def reference_for(run: Run, checkpoint: Path, scratch: Path) -> list[Generation]:
    if run.checkpoint in QUANTIZED:
        plain = dequantized_checkpoint(checkpoint, scratch / f"{run.checkpoint}-dequantized")
        return transformers_greedy(
            plain, "float32", MAX_TOKENS, TOP_K, prepare=fake_quantize_activations
        )
    return transformers_greedy(checkpoint, "float32", MAX_TOKENS, TOP_K)


def judge(run: Run, result: Result, reference: list[Generation], got: list[Generation]) -> None:
    """fp32: equal tokens within FP32_TOLERANCE; else the tests' bf16 rules, which raise
    AssertionError naming what broke them."""
    result.greedy_equal = all(r.token_ids == g.token_ids for r, g in zip(reference, got))
    result.max_logprob_diff = round(float(logprob_drift(reference, got).max()), 6)
    if run.dtype == "float32":
        result.passed = result.greedy_equal and result.max_logprob_diff < FP32_TOLERANCE
        return
    check_logprobs_close(reference, got)
    assert_bf16_drift(reference, got)
    result.passed = True


def measure(run: Run, checkpoint: Path, scratch: Path, logs: Path) -> Result:
    result = Result(run)
    reference = reference_for(run, checkpoint, scratch)
    ports = (free_port(), free_port())
    with two_hosts() as hosts:
        hosts = hosts[: run.nodes]
        began = time.monotonic()
        nodes = [
            start_node(rank, hosts, checkpoint, ports, logs / f"{run.name}-node{rank}.log",
                       ["--dtype", run.dtype, *SMALL_ENGINE], run.tp, NNODES=str(run.nodes))
            for rank in range(run.nodes)
        ]  # fmt: skip
        url = f"http://{hosts[0].address}:{ports[0]}"
        try:
            wait_until_healthy(nodes, lambda: healthy(hosts[0], url), logs, START_TIMEOUT)
            result.start_seconds = round(time.monotonic() - began, 1)
            for process in nodes:
                ranks, total = node_memory(process)
                result.rank_rss_mb.update(ranks)
                result.node_rss_mb.append(total)
            got = [
                served_greedy(hosts[0], url, checkpoint, ids, MAX_TOKENS, TOP_K)
                for ids in prompt_token_ids(checkpoint)
            ]
            judge(run, result, reference, got)
        except (RuntimeError, AssertionError) as error:
            result.error = str(error)[-1500:]
        finally:
            for process in nodes:
                stop(process)
    return result


def checkpoint_for(run: Run, scratch: Path) -> Path:
    if run.checkpoint == "w8a8-fixture":
        return W8A8_FIXTURE
    if run.checkpoint in QUANTIZED:
        geometry, overrides = QUANTIZED[run.checkpoint]
        source = build_checkpoint(scratch / f"{run.checkpoint}-bf16", geometry, dtype="bfloat16",
                                  **overrides)  # fmt: skip
        return quantize_checkpoint(source, scratch / run.checkpoint)
    return build_checkpoint(scratch / f"{run.checkpoint}-{run.dtype}", run.checkpoint, run.dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=[r.name for r in RUNS],
                        default=[r.name for r in RUNS])  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--logs", type=Path, help="node logs (default: a temporary directory)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="world-sizes-"))
    logs = args.logs or scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    built: dict[tuple[str, str], Path] = {}
    results = []
    for run in [r for r in RUNS if r.name in args.runs]:
        key = (run.checkpoint, run.dtype)
        if key not in built:
            built[key] = checkpoint_for(run, scratch)
        result = measure(run, built[key], scratch, logs)
        results.append(result)
        verdict = "passed" if result.passed else f"FAILED {result.error[-300:]}"
        ranks = sorted(result.rank_rss_mb.values())
        print(f"{run.name}: start {result.start_seconds} s, ranks {ranks} MB, greedy equal "
              f"{result.greedy_equal}, max |dlogprob| {result.max_logprob_diff}: {verdict}",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "host": platform_summary(), "runs": [asdict(r) for r in results],
            "logs": str(logs)}, indent=2) + "\n")  # fmt: skip
    return 0 if all(r.passed for r in results) else 1


def platform_summary() -> dict:
    import vllm

    return dict(machine(None), vllm=vllm.__version__,
                memory_gib=round(psutil.virtual_memory().total / 2**30, 1))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
