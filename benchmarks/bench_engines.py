"""Side-by-side speed of this plugin, vLLM's built-in ERNIE class, transformers and llama.cpp.

Checkpoint: the exact ERNIE-4.5-21B-A3B geometry with 4 layers (dense layer 0 + 3 MoE layers),
random bf16 weights with a random router (built once and cached), its W8A8_DYNAMIC and W8A16
versions written by ``vllm_ernie_moe.tools.quantize`` and, for llama.cpp, GGUF BF16 / Q8_0
conversions of the same weights. The 4-bit engines (the plugin's ``w4a8`` and ``w4a16``, llama.cpp's
Q4_0 and Q4_K_M) load random W4A8_DYNAMIC / W4A16 checkpoints written tensor by tensor
(``build_int4_checkpoint``); llama.cpp's files are the dequantized weights of one of them
(``--int4-source``), converted to Q8_0 and quantized by llama.cpp's own quantizer. ``--layers 28``
is the whole ERNIE-4.5-21B-A3B: only the 4-bit engines run at that size (its bf16 checkpoint, 43
GB, does not fit this machine's memory; W8A8 needs ~22 GB).

Each engine runs in its own subprocess on the same cores; rows: bs=1 decode (128 in / 64 out),
bs=8 decode, 1024-token prefill; for vLLM also engine load time and peak memory while
loading (PSS of the benchmark process and its engine/worker children, sampled every second;
serving adds only the fixed 1 GiB KV cache, already allocated at load). "roofline" is not an
engine: the bs=1 decode speed at which the weights stream at the best GEMV rate measured.

    python benchmarks/bench_engines.py --rounds 2   # every engine installed, interleaved rounds
    python benchmarks/bench_engines.py --engines plugin builtin --json out.json
    python benchmarks/bench_engines.py --layers 28 --engines w4a8 llama.cpp-q4_0 llama.cpp-q4_k_m
    python benchmarks/bench_engines.py --layers 28 --int4-source w4a16 --engines w4a16 ...
    python benchmarks/bench_engines.py --cpu-tier avx2 --llama-cpp-path /opt/llama-avx2 ...

``--cpu-tier`` runs every vLLM engine as a lower kernel tier (``vllm_ernie_moe.cpu_tier``);
llama.cpp's tier is the one it was built for: ``--llama-cpp-path`` puts a build made with that
tier's flags (see llama_cpp_engine.py) first on the engines' import path.

Decode tok/s = tokens generated after each prompt's first / seconds from the first token to the
last, as each engine times its own steps (vLLM's request metrics, llama.cpp's and transformers'
step times), so no prefill is in it: taking a 1-token run's time from a 64-token run's left the
prefill's noise in the difference (at bs=8 the prefill is 40% of the run).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = {
    "roofline": "roofline: weight bytes / best GEMV rate (benchmarks/roofline.py)",
    "plugin": "vLLM + vllm-ernie-moe, bf16",
    "plugin-stock-kernels": "vLLM + vllm-ernie-moe, bf16, VLLM_ERNIE_MOE_SGL_KERNELS=0",
    "plugin-unwidened": "vLLM + vllm-ernie-moe, bf16, VLLM_ERNIE_MOE_BF16_WIDENING=0",
    "builtin": "vLLM 0.32 built-in class, bf16",
    "transformers": "transformers (eager), bf16",
    "w8a8": "vLLM + vllm-ernie-moe, W8A8_DYNAMIC",
    "w8a8-int8-head": "vLLM + vllm-ernie-moe, W8A8_DYNAMIC + int8 lm_head",
    "w8a8-stock-kernels": "vLLM + vllm-ernie-moe, W8A8_DYNAMIC, VLLM_ERNIE_MOE_SGL_KERNELS=0",
    "w8a16": "vLLM + vllm-ernie-moe, W8A16",
    "llama.cpp-bf16": "llama.cpp BF16 (llama-cpp-python 0.3.36)",
    "llama.cpp-q8_0": "llama.cpp Q8_0 (llama-cpp-python 0.3.36)",
    "w4a8": "vLLM + vllm-ernie-moe, W4A8_DYNAMIC (int4 experts)",
    "w4a8-int8-head": "vLLM + vllm-ernie-moe, W4A8_DYNAMIC + int8 lm_head",
    "w4a16": "vLLM + vllm-ernie-moe, W4A16 (int4 per group of 128, every linear)",
    "w4a16-int8-head": "vLLM + vllm-ernie-moe, W4A16 + int8 lm_head",
    "w4a16-int8-head-one-process": "the same, engine core and worker in the caller's process",
    "w4a16-int8-head-worker-process": "the same, the worker in a process of its own (vLLM's)",
    "w4a16-int8-head-int4-prefill": "the same, the linears on int4 at every size (no int8 copy)",
    "w4a16-int8-head-avx2-kernel": "the same, on the plugin's AVX2 int4 kernel (no VNNI)",
    "llama.cpp-q4_0": "llama.cpp Q4_0 of the 4-bit checkpoint (llama-cpp-python 0.3.36)",
    "llama.cpp-q4_k_m": "llama.cpp Q4_K_M of the 4-bit checkpoint (llama-cpp-python 0.3.36)",
}
#: Engines that load a 4-bit checkpoint (W4A8_DYNAMIC, W4A16) or GGUF files made from one.
INT4_ENGINES = (
    "w4a8",
    "w4a8-int8-head",
    "w4a16",
    "w4a16-int8-head",
    "w4a16-int8-head-one-process",
    "w4a16-int8-head-worker-process",
    "w4a16-int8-head-int4-prefill",
    "w4a16-int8-head-avx2-kernel",
    "llama.cpp-q4_0",
    "llama.cpp-q4_k_m",
)
#: The int4 checkpoint's label, by ``--int4-source``, for llama.cpp's 4-bit files.
INT4_SOURCES = {"w4a8": "W4A8_DYNAMIC", "w4a16": "W4A16"}
INT8_HEAD = {"VLLM_ERNIE_MOE_INT8_LM_HEAD": "1"}
# Engine -> extra environment for its process.
ENGINE_ENV = {
    "builtin": {"VLLM_PLUGINS": "none"},  # load no general plugin: vLLM's own ERNIE class
    "w8a8-int8-head": INT8_HEAD,
    "w4a8-int8-head": INT8_HEAD,
    "w4a16-int8-head": INT8_HEAD,
    "w4a16-int8-head-one-process": dict(INT8_HEAD, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    "w4a16-int8-head-worker-process": dict(INT8_HEAD, VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE="0"),
    "w4a16-int8-head-int4-prefill": dict(INT8_HEAD, VLLM_ERNIE_MOE_W4A16_INT8_PREFILL="0"),
    "w4a16-int8-head-avx2-kernel": dict(INT8_HEAD, VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL="1"),
    "plugin-stock-kernels": {"VLLM_ERNIE_MOE_SGL_KERNELS": "0"},
    "plugin-unwidened": {"VLLM_ERNIE_MOE_BF16_WIDENING": "0"},
    "w8a8-stock-kernels": {"VLLM_ERNIE_MOE_SGL_KERNELS": "0"},
}
PROMPT_LEN, DECODE_LEN, PREFILL_LEN, BATCH = 128, 64, 1024, 8
# Same cores for every engine: vLLM otherwise reserves one of two cores for its front end.
# A 1 GiB KV cache holds 8 x 2048 tokens of this 4-layer model many times over.
BENCH_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def measure(generate) -> dict[str, float]:
    """generate(prompts, max_tokens) -> seconds from the prompts' first tokens to their last (all
    prompts decode in step); returns the three rows in tok/s."""
    vocab = 100000
    one = random_prompts(1, PROMPT_LEN, vocab, 0)
    batch = random_prompts(BATCH, PROMPT_LEN, vocab, 1)
    generate(random_prompts(1, 32, vocab, 3), 4)  # warm-up

    def decode_rate(prompts) -> float:
        seconds = min(generate(prompts, DECODE_LEN) for _ in range(3))
        return len(prompts) * (DECODE_LEN - 1) / seconds

    def prefill_seconds(seed: int) -> float:
        start = time.perf_counter()
        generate(random_prompts(1, PREFILL_LEN, vocab, seed), 1)
        return time.perf_counter() - start

    return {
        "bs1_decode_tok_s": decode_rate(one),
        "bs8_decode_tok_s": decode_rate(batch),
        # A new prompt each time: vLLM's prefix cache would serve a repeated one.
        "prefill_1024_tok_s": PREFILL_LEN / min(prefill_seconds(seed) for seed in (2, 4)),
    }


def tree_pss_gib() -> float:
    """Memory of this process and its children (engine, workers) as PSS, which counts pages shared
    between them (libraries, the safetensors mmap) once, not once per process."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_full_info().pss for p in (me, *me.children(recursive=True))) / 2**30


#: Seconds between PSS samples while an engine loads. Reading the smaps of a 15 GB worker is not
#: free: every 0.1 s it took about half of one of the two cores during the 28-layer W4A16 load
#: (ps, 2026-12-04), slowing the load it measured.
PSS_INTERVAL_S = 1.0


class PeakMemory:
    """The peak of :func:`tree_pss_gib`, sampled every :data:`PSS_INTERVAL_S` until :meth:`stop`."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self.running = 0.0, True

        def sample() -> None:
            while self.running:
                try:
                    self.peak = max(self.peak, tree_pss_gib())
                except psutil.Error:  # a child exited while being read
                    pass
                time.sleep(PSS_INTERVAL_S)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak


def vllm_generate(llm, prompts: list[list[int]], tokens: int) -> list:
    """Greedy decoding of exactly ``tokens`` new tokens for each prompt (token ids); returns
    vLLM's outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def decode_seconds(outputs: list) -> float:
    """The engine core's seconds from the step of the last prompt's first token to that prompt's
    last token (request metrics: the engine needs ``disable_log_stats=False``, as
    :func:`vllm_engine`'s). Every prompt decodes in those steps. vLLM may start some prompts a
    step before the rest; those end a step early, so up to one token each is counted that the
    window did not make (at most 7 of 504 at bs=8)."""
    last_started = max((o.metrics for o in outputs), key=lambda m: m.first_token_ts)
    return last_started.last_token_ts - last_started.first_token_ts


def greedy_token_ids(llm, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Up to ``tokens`` greedy tokens after each prompt (token ids), ignoring EOS."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def timed_vllm_generate(llm, prompts: list[list[int]], tokens: int) -> float:
    """Seconds :func:`vllm_generate` takes."""
    start = time.perf_counter()
    vllm_generate(llm, prompts, tokens)
    return time.perf_counter() - start


def vllm_engine(checkpoint: str):
    """The benchmarks' vLLM engine on ``checkpoint``."""
    from vllm import LLM

    return LLM(
        model=checkpoint,
        dtype="bfloat16",
        max_model_len=2048,
        max_num_seqs=BATCH,
        disable_log_stats=False,  # request metrics: decode_seconds
    )


def run_vllm(checkpoint: str) -> dict[str, float]:
    memory = PeakMemory()
    start = time.perf_counter()
    llm = vllm_engine(checkpoint)
    load_s = time.perf_counter() - start
    peak_pss_gib = memory.stop()  # sampling PSS costs CPU: never during the timed runs

    def generate(prompts: list[list[int]], tokens: int) -> float:
        return decode_seconds(vllm_generate(llm, prompts, tokens))

    return dict(measure(generate), load_s=load_s, peak_pss_gib=peak_pss_gib)


def run_transformers(checkpoint: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)

    def generate(prompts, tokens) -> float:
        steps = []  # called once per generated token, after its forward pass

        def timestamp(input_ids, scores):
            steps.append(time.perf_counter())
            return scores

        ids = torch.tensor(prompts)
        model.generate(
            ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            logits_processor=[timestamp],
        )
        return steps[-1] - steps[0]

    return measure(generate)


def run_llama_cpp(gguf: str) -> dict[str, float]:
    from llama_cpp_engine import timed_engine

    generate, load_s = timed_engine(Path(gguf), threads=os.cpu_count() or 1)
    return dict(measure(generate), load_s=load_s)


def run_roofline(checkpoint: str) -> dict[str, float]:
    from roofline import measure_bandwidth, roofline

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    bandwidth = measure_bandwidth(config["hidden_size"])
    bounds = roofline(config, bandwidth)
    return dict(bandwidth, **bounds, bs1_decode_tok_s=bounds["bf16_tok_s"])


def child(engine: str, checkpoint: str, out: str) -> None:
    """One engine's measurements, in a fresh process."""
    if engine == "transformers":
        result = run_transformers(checkpoint)
    elif engine == "roofline":
        result = run_roofline(checkpoint)
    elif engine.startswith("llama.cpp"):
        result = run_llama_cpp(checkpoint)
    else:
        result = run_vllm(checkpoint)
    Path(out).write_text(json.dumps(result))


def _geometry(layers: int) -> dict[str, int]:
    return dict(num_hidden_layers=layers, moe_layer_end_index=layers - 1)


def checkpoint_paths(cache: Path, layers: int = 4) -> tuple[Path, Path]:
    """The BF16 21B-geometry checkpoint with ``layers`` layers (dense layer 0, the rest MoE) and its
    W8A8_DYNAMIC (msModelSlim format) version, built once."""
    from vllm_ernie_moe.tools.quantize import quantize_checkpoint
    from vllm_ernie_moe.tools.random_checkpoint import build_checkpoint

    bf16, w8a8 = cache / f"21b-{layers}layers-bf16", cache / f"21b-{layers}layers-w8a8"
    if not (bf16 / "config.json").exists():
        print(f"building the 21B-geometry {layers}-layer checkpoint in {bf16} ...", flush=True)
        build_checkpoint(bf16, "21b-4layers", dtype="bfloat16", **_geometry(layers))
    if not w8a8.exists():
        quantize_checkpoint(bf16, w8a8)
    return bf16, w8a8


def w8a16_checkpoint(bf16: Path) -> Path:
    """The W8A16 (msModelSlim format) version of the BF16 checkpoint ``bf16``, built once."""
    from vllm_ernie_moe.tools.quantize import W8A16, quantize_checkpoint

    w8a16 = bf16.with_name(bf16.name.replace("-bf16", "-w8a16"))
    if not (w8a16 / "config.json").exists():
        quantize_checkpoint(bf16, w8a16, label=W8A16)
    return w8a16


def int4_checkpoint(cache: Path, layers: int, label: str = "W4A8_DYNAMIC") -> Path:
    """The random W4A8_DYNAMIC (or W4A16) 21B-geometry checkpoint with ``layers`` layers, built
    once."""
    from vllm_ernie_moe.tools.random_checkpoint import build_int4_checkpoint

    path = cache / f"21b-{layers}layers-{'w4a16' if label == 'W4A16' else 'w4a8'}"
    if not (path / "config.json").exists():
        print(f"building the {label} {layers}-layer checkpoint in {path} ...", flush=True)
        build_int4_checkpoint(path, "21b-4layers", label=label, **_geometry(layers))
    return path


def engine_checkpoint(
    engine: str, cache: Path, layers: int, llama_src: str | None, int4_source: str = "w4a8"
) -> Path:
    """What ``engine`` loads; llama.cpp's files are GGUF conversions of the BF16 checkpoint or,
    for the 4-bit formats, of the ``int4_source`` one, made once (see :func:`gguf_file`)."""
    if engine in INT4_ENGINES:
        kind = engine.split("-")[0] if engine.startswith("w4") else int4_source
        source = int4_checkpoint(cache, layers, INT4_SOURCES[kind])
    else:
        bf16, w8a8 = checkpoint_paths(cache, layers)
        source = w8a8 if engine.startswith("w8a8") else bf16
        if engine == "w8a16":
            source = w8a16_checkpoint(bf16)
    if not engine.startswith("llama.cpp"):
        return source
    return gguf_file(source, engine.removeprefix("llama.cpp-"), llama_src)


def gguf_file(source: Path, outtype: str, llama_src: str | None) -> Path:
    """``source`` as GGUF ``outtype``, converted once by llama.cpp's converter; a 4-bit type is
    quantized by llama.cpp's quantizer from a Q8_0 conversion, deleted afterwards (23 GB at 28
    layers: the disk holds the checkpoint and both 4-bit files, not the Q8_0 as well)."""
    from llama_cpp_engine import QUANTIZER_TYPES, convert, quantize

    gguf = source.with_name(f"{source.name.removesuffix('-bf16')}-{outtype}.gguf")
    if gguf.exists():
        return gguf
    if outtype in QUANTIZER_TYPES:
        q8_0 = gguf_file(source, "q8_0", llama_src)
        quantize(q8_0, gguf, outtype)
        q8_0.unlink()
        return gguf
    if llama_src is None:
        sys.exit(f"{source.name} as {outtype}: pass --llama-cpp-src (see llama_cpp_engine.py)")
    convert(source, gguf, outtype, Path(llama_src))
    return gguf


def engine_environment(engine: str, tier: str | None, llama_cpp_path: str | None) -> dict[str, str]:
    """The variables ``engine``'s process gets beyond the benchmark's own: its settings, the forced
    kernel tier of a vLLM engine, the llama.cpp build of a llama.cpp engine."""
    env = dict(ENGINE_ENV.get(engine, {}))
    if engine.startswith("llama.cpp"):
        if llama_cpp_path:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, (llama_cpp_path, os.environ.get("PYTHONPATH")))
            )
    elif tier:
        from vllm_ernie_moe import cpu_tier

        env.update(cpu_tier.environment(cpu_tier.TIERS_BY_NAME[tier]))
    return env


def run_child(script: str, task: str, checkpoint: Path, out: Path, env: dict[str, str]) -> dict:
    """``script --child task checkpoint out`` in a fresh process on the benchmark environment plus
    ``env``; its output goes to ``out``'s .log, its JSON result to ``out``."""
    print(f"running {task} on {checkpoint.name} {env or ''} ...", flush=True)
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, script, "--child", task, str(checkpoint), str(out)],
            env=dict(os.environ, **BENCH_ENV, **env),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        sys.exit(f"{task} on {checkpoint.name} failed; its log is {log}")
    return json.loads(out.read_text())


SPEED_KEYS = ("bs1_decode_tok_s", "bs8_decode_tok_s", "prefill_1024_tok_s")
# (numerator, denominator, metrics): the ratios the project's goals are stated in.
RATIOS = (
    ("plugin", "roofline", ("bs1_decode_tok_s",)),
    ("plugin", "builtin", SPEED_KEYS),
    ("w8a8-int8-head", "llama.cpp-q8_0", SPEED_KEYS),
    ("plugin", "llama.cpp-bf16", SPEED_KEYS),
    ("w8a8", "plugin", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("w8a8", "llama.cpp-q8_0", SPEED_KEYS),
    ("w8a16", "llama.cpp-q8_0", SPEED_KEYS),
    ("w8a16", "plugin", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("plugin", "plugin-stock-kernels", SPEED_KEYS),
    ("plugin", "plugin-unwidened", SPEED_KEYS),
    ("w8a8", "w8a8-stock-kernels", SPEED_KEYS),
    ("w8a8-int8-head", "w8a8", (*SPEED_KEYS, "peak_pss_gib")),
    ("w4a8", "llama.cpp-q4_k_m", SPEED_KEYS),
    ("w4a8-int8-head", "llama.cpp-q4_k_m", SPEED_KEYS),
    ("w4a8-int8-head", "w4a8", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("w4a8", "llama.cpp-q4_0", SPEED_KEYS),
    ("w4a8", "w8a8", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("w4a16", "llama.cpp-q4_k_m", SPEED_KEYS),
    ("w4a16-int8-head", "llama.cpp-q4_k_m", SPEED_KEYS),
    ("w4a16-int8-head", "llama.cpp-q4_0", SPEED_KEYS),
    ("w4a16-int8-head-avx2-kernel", "w4a16-int8-head", (*SPEED_KEYS, "load_s")),
    ("w4a16-int8-head-avx2-kernel", "llama.cpp-q4_k_m", SPEED_KEYS),
    ("w4a16-int8-head", "w4a16-int8-head-worker-process", (*SPEED_KEYS, "load_s")),
    ("w4a16-int8-head", "w4a16-int8-head-int4-prefill", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("w4a16", "w4a8", (*SPEED_KEYS, "load_s", "peak_pss_gib")),
    ("w4a16", "llama.cpp-q4_0", SPEED_KEYS),
)


#: The CPU flags that decide vLLM's, PyTorch's and llama.cpp's kernels.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")


def machine(tier: str | None) -> dict:
    """The CPU the numbers come from: two CPUs of one name can differ 2x in compute (an EPYC of
    CPU family 25, Zen 4, runs AVX-512 at half the width of family 26, Zen 5); ``tier`` is the
    kernel tier the vLLM engines were forced to (None: the host's own)."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name"),
        "cpu_family": info.get("cpu family"),
        "cpu_model": info.get("model"),
        "cores": os.cpu_count(),
        "kernel_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
        "vllm_tier": tier or "host",
    }


def best_of(old: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    """Per metric the better of two rounds: higher speed and bandwidth, shorter load, lower
    memory."""
    if old is None:
        return new
    lower_is_better = ("load_s", "peak_pss_gib")
    return {k: min(old[k], new[k]) if k in lower_is_better else max(old[k], new[k]) for k in new}


def _cell(r: dict[str, float], key: str, digits: int) -> str:
    return f"{r[key]:.{digits}f}" if key in r else "-"


def markdown(results: dict[str, dict[str, float]], rounds: dict[str, list[dict]]) -> str:
    rows = [
        "| engine (2 cores) | bs=1 decode tok/s | bs=8 decode tok/s | prefill 1024 tok/s "
        "| load s | peak PSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        cells = [_cell(r, k, d) for k, d in zip(SPEED_KEYS, (1, 1, 0))]
        cells += [_cell(r, "load_s", 1), _cell(r, "peak_pss_gib", 2)]
        rows.append(f"| {ENGINES[engine]} | {' | '.join(cells)} |")
    rows += ["", "| ratio | " + " | ".join(SPEED_KEYS) + " | load_s | peak_pss_gib |"]
    rows.append("|---" * (len(SPEED_KEYS) + 3) + "|")
    for a, b, keys in RATIOS:
        if a in results and b in results:
            cells = [
                f"{results[a][k] / results[b][k]:.2f}" if k in keys else ""
                for k in (*SPEED_KEYS, "load_s", "peak_pss_gib")
            ]
            rows.append(f"| {a} / {b} | {' | '.join(cells)} |")
    rows += ["", "Per round (the machine's speed drifts within a run; pairs ran back to back):"]
    for a, b, keys in RATIOS:
        if a in rounds and b in rounds:
            per_round = "; ".join(
                ", ".join(f"{ra[k] / rb[k]:.2f}" for k in keys if k in SPEED_KEYS)
                for ra, rb in zip(rounds[a], rounds[b])
            )
            rows.append(f"- {a} / {b}: {per_round}")
    if "roofline" in results:
        r = results["roofline"]
        rates = ", ".join(
            f"{k} {v:.1f}" for k, v in r.items() if not k.endswith(("tok_s", "token"))
        )
        rows += ["", f"roofline: batch-1 GEMV rates in GB/s, best of the rounds: {rates}"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    installed = [e for e in ENGINES if not e.startswith("llama.cpp") or find_spec("llama_cpp")]
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=installed)
    parser.add_argument("--cache", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every engine this often, keep each one's best"
    )
    parser.add_argument(
        "--llama-cpp-src", help="llama.cpp source (for its GGUF converter), see llama_cpp_engine.py"
    )
    parser.add_argument(
        "--layers", type=int, default=4, help="28: the whole 21B-A3B (4-bit engines only)"
    )
    parser.add_argument(
        "--int4-source",
        choices=INT4_SOURCES,
        default="w4a8",
        help="the checkpoint llama.cpp's 4-bit files are made from (the same weights)",
    )
    parser.add_argument(
        "--cpu-tier",
        choices=("avx2", "avx512"),
        help="run the vLLM engines as this lower kernel tier (vllm_ernie_moe.cpu_tier)",
    )
    parser.add_argument(
        "--llama-cpp-path", help="a llama-cpp-python build (pip --target) to import instead"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("ENGINE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.cache)
    if args.layers > 4 and not all(e in INT4_ENGINES for e in args.engines):
        parser.error(f"--layers {args.layers}: only {', '.join(INT4_ENGINES)} fit this machine")
    results: dict[str, dict[str, float]] = {}
    rounds: dict[str, list[dict[str, float]]] = {}
    checkpoints = {
        e: engine_checkpoint(e, cache, args.layers, args.llama_cpp_src, args.int4_source)
        for e in args.engines
    }
    # The plugin's repack entries (13 GB for 28 layers) beside the checkpoints they come from,
    # not in the home directory's vLLM cache: deleting --cache deletes them. A setting outside wins.
    from vllm_ernie_moe.envs import REPACK_CACHE_VARIABLE as variable

    repack_cache = {} if variable in os.environ else {variable: str(cache / "ernie_moe_repack")}
    for engine in args.engines * args.rounds:
        out = cache / f"{engine}.json"
        env = dict(repack_cache, **engine_environment(engine, args.cpu_tier, args.llama_cpp_path))
        measured = run_child(__file__, engine, checkpoints[engine], out, env)
        rounds.setdefault(engine, []).append(measured)
        results[engine] = best_of(results.get(engine), measured)
        print(engine, measured, flush=True)
    host = dict(
        machine(args.cpu_tier), llama_cpp_path=args.llama_cpp_path, int4_source=args.int4_source
    )
    print(f"machine: {host}")
    print(markdown(results, rounds))
    if args.json:
        report = {"machine": host, "best": results, "rounds": rounds}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
