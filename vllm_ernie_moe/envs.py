"""Every environment variable this plugin reads, in one place."""

import os
from pathlib import Path

#: ``avx2`` / ``avx512`` / ``avx512_bf16``: run as that x86 kernel tier (see ``cpu_tier.py``).
CPU_TIER_VARIABLE = "VLLM_ERNIE_MOE_CPU_TIER"


def cpu_tier_name() -> str:
    """``VLLM_ERNIE_MOE_CPU_TIER``, lower case; empty when unset (the host's own tier)."""
    return os.environ.get(CPU_TIER_VARIABLE, "").strip().lower()


def use_all_cpu_cores() -> None:
    """On vLLM's CPU backend, compute on every core (vLLM reserves one for its front end by default)
    and keep the KV cache small; explicit user settings win. Call before vLLM starts an engine."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def int8_lm_head() -> bool:
    """``VLLM_ERNIE_MOE_INT8_LM_HEAD=1``: with ``ernie-w8a8-dynamic``, also quantize the lm_head at
    load (per-row int8 with msModelSlim's formula, per-token int8 activations). At batch 1 the
    bf16 lm_head is a third of the bytes a token reads; the embedding stays bf16."""
    return os.environ.get("VLLM_ERNIE_MOE_INT8_LM_HEAD", "0") == "1"


def w8a16_int8_in_memory() -> bool | None:
    """``VLLM_ERNIE_MOE_W8A16_INT8=1`` keeps msModelSlim W8A16 weights int8 in memory (half the
    bytes), ``0`` dequantizes them at load; unset: whichever kernel is faster on this CPU
    (``vllm_ernie_moe.portable_kernels.bf16_gemm_is_slow``)."""
    value = os.environ.get("VLLM_ERNIE_MOE_W8A16_INT8", "")
    return None if value == "" else value == "1"


def w4a16_int8_activations() -> bool:
    """``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS`` (default 1): where vLLM's int4 kernels are exact
    (VNNI), W4A16 experts and linears run on them, which quantize the activations to int8 per token
    inside (several times the int4 weight-only GEMM's speed; perplexity in docs/w8a8.md). ``0``
    keeps the activations in the model dtype everywhere, W4A16's math as on the NPU."""
    return os.environ.get("VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS", "1") != "0"


def w4a16_int8_prefill() -> bool:
    """``VLLM_ERNIE_MOE_W4A16_INT8_PREFILL`` (default 1): W4A16 linears on vLLM's int4 kernel also
    keep an int8 per-row copy of their weights (made at load, kept in the repack cache, read on
    first use) for calls of 32 rows or more, where vLLM's int8 GEMM runs 1.7-2x faster than its
    int4 one (``quant/int4.py``; perplexity in docs/w8a8.md). ``0``: int4 at every size. Off too
    under vLLM's ``VLLM_BATCH_INVARIANT=1``: which kernel runs follows a step's rows, so with the
    copy a request's numbers depend on what it is batched with."""
    from vllm import envs as vllm_envs

    enabled = os.environ.get("VLLM_ERNIE_MOE_W4A16_INT8_PREFILL", "1") != "0"
    return enabled and not vllm_envs.VLLM_BATCH_INVARIANT


def w4a16_avx2_kernel() -> bool:
    """``VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL`` (default 1): where vLLM's int4 kernels do not serve
    W4A16 (x86 without VNNI), its linears and experts run on the plugin's AVX2 int4 kernel, built
    at first use, which quantizes the activations to int8 per weight group below 128 rows per call
    (``native_int4.py``; perplexity in docs/cpu-tiers.md). ``0``: the portable kernels,
    activations in the model dtype (as does ``VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS=0``)."""
    return os.environ.get("VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL", "1") != "0"


def full_warmup() -> bool:
    """``VLLM_ERNIE_MOE_FULL_WARMUP=1`` keeps vLLM's full-size CPU warm-up (a
    ``max_num_batched_tokens`` forward) where the plugin would compile on a brief one
    (``patches/patch_cpu_warmup_size.py``); default off."""
    return os.environ.get("VLLM_ERNIE_MOE_FULL_WARMUP", "0") == "1"


def sgl_kernels_without_amx() -> bool:
    """``VLLM_ERNIE_MOE_SGL_KERNELS=0`` keeps vLLM's own kernel choice (oneDNN GEMMs, "vec" bf16
    experts) on AVX-512 CPUs without AMX (``patches/patch_cpu_sgl_kernels.py``); default on."""
    return os.environ.get("VLLM_ERNIE_MOE_SGL_KERNELS", "1") != "0"


def bf16_widening() -> bool:
    """``VLLM_ERNIE_MOE_BF16_WIDENING=0`` keeps vLLM's bf16 ``F.linear`` at every batch size on x86
    tiers without AVX-512 BF16 (``patches/patch_cpu_unquantized_gemm.py``); default on."""
    return os.environ.get("VLLM_ERNIE_MOE_BF16_WIDENING", "1") != "0"


def vllm_mtp_drafter() -> bool:
    """``VLLM_ERNIE_MOE_VLLM_MTP=1`` leaves ERNIE's MTP drafter to vLLM's own ``ErnieMTP`` (to
    compare the two on the same weights, ``benchmarks/bench_small_model.py``); default: the
    plugin's."""
    return os.environ.get("VLLM_ERNIE_MOE_VLLM_MTP", "0") == "1"


#: ``0``: an engine's one CPU worker in a process of its own, as in vLLM.
WORKER_IN_ENGINE_CORE_VARIABLE = "VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE"


def worker_in_engine_core() -> bool:
    """On CPU the one worker of an engine runs inside vLLM's engine-core process, which starts
    with the worker's OpenMP binding (``patches/patch_cpu_engine_core_worker.py``): one process
    start fewer. ``VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE=0``: vLLM's layout, a worker process."""
    return os.environ.get(WORKER_IN_ENGINE_CORE_VARIABLE, "1") != "0"


#: ``0``: ``vllm serve`` spawns its engine core as vLLM does (``engine_core_server.py``).
ENGINE_CORE_SERVER_VARIABLE = "VLLM_ERNIE_MOE_ENGINE_CORE_SERVER"


def engine_core_server() -> bool:
    """``vllm serve`` on CPU forks its engine core from a server that imported it during the API
    server's own imports, where the environment allows (``engine_core_server.py``). Read by the
    ``.pth`` start hook, so before vLLM is imported."""
    return os.environ.get(ENGINE_CORE_SERVER_VARIABLE, "1") != "0"


#: The plugin's own files: wheels the tests read, the engine-core server's notes.
CACHE_DIR_VARIABLE = "VLLM_ERNIE_MOE_CACHE_DIR"


def cache_dir() -> Path:
    """``VLLM_ERNIE_MOE_CACHE_DIR`` (default ``~/.cache/vllm-ernie-moe``, as in the Makefile)."""
    value = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vllm-ernie-moe"


def build_settings() -> list[str]:
    """The switches above that change how the model is built (its kernels, its parameters), as in
    effect: what a saved compilation of the model depends on besides code and hardware."""
    return [
        f"cpu tier={cpu_tier_name()}",
        f"int8 lm_head={int8_lm_head()}",
        f"w8a16 int8 in memory={w8a16_int8_in_memory()}",
        f"w4a16 int8 activations={w4a16_int8_activations()}",
        f"w4a16 int8 prefill={w4a16_int8_prefill()}",
        f"w4a16 avx2 kernel={w4a16_avx2_kernel()}",
        f"sgl kernels without amx={sgl_kernels_without_amx()}",
        f"bf16 widening={bf16_widening()}",
        f"vllm mtp drafter={vllm_mtp_drafter()}",
    ]


#: Seconds a rank of a multi-node engine waits for the others (see ``node_timeout_seconds``).
NODE_TIMEOUT_VARIABLE = "VLLM_ERNIE_MOE_NODE_TIMEOUT"


def node_timeout_seconds() -> int:
    """``VLLM_ERNIE_MOE_NODE_TIMEOUT`` (default 900): with ``--nnodes`` above 1 and no
    ``--distributed-timeout-seconds``, how long a rank waits for the other nodes' ranks, at start
    and in every collective, before its engine fails (torch's own defaults: 30 min for gloo)."""
    value = os.environ.get(NODE_TIMEOUT_VARIABLE, "900")
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"{NODE_TIMEOUT_VARIABLE}={value!r}: give whole seconds above 0")
    return int(value)


#: Where load-time repacks are kept (``quant/repack_cache.py``).
REPACK_CACHE_VARIABLE = "VLLM_ERNIE_MOE_REPACK_CACHE"


def repack_cache_dir() -> Path | None:
    """``VLLM_ERNIE_MOE_REPACK_CACHE``: a directory for repacked weights (default
    ``$VLLM_CACHE_ROOT/ernie_moe_repack``, beside vLLM's compile cache), or ``off`` (also ``0``)
    to repack at every start. One directory serves every checkpoint; deleting it is always
    safe."""
    value = os.environ.get(REPACK_CACHE_VARIABLE, "").strip()
    if value.lower() in ("off", "0"):
        return None
    if value:
        return Path(value).expanduser()
    import vllm.envs

    return Path(vllm.envs.VLLM_CACHE_ROOT) / "ernie_moe_repack"


#: Key the repack cache by content only (``repack_cache_keys_by_content``).
REPACK_CACHE_VERIFY_VARIABLE = "VLLM_ERNIE_MOE_REPACK_CACHE_VERIFY"


def repack_cache_keys_by_content() -> bool:
    """``VLLM_ERNIE_MOE_REPACK_CACHE_VERIFY=1``: key every repack by the bytes it repacks, read and
    hashed at every start. Default: a local checkpoint directory's repacks are keyed by its path
    and its files' names, sizes, inodes, modification and change times and safetensors headers,
    and a warm start does not read the routed experts the cache replaces; any write makes a new
    key (``quant/repack_cache.py``)."""
    return os.environ.get(REPACK_CACHE_VERIFY_VARIABLE, "0") == "1"


#: Read ahead what the last start read (``repack_cache_read_ahead``).
REPACK_CACHE_READ_AHEAD_VARIABLE = "VLLM_ERNIE_MOE_REPACK_CACHE_READ_AHEAD"


def repack_cache_read_ahead() -> bool:
    """``VLLM_ERNIE_MOE_REPACK_CACHE_READ_AHEAD`` (default 1): with a repack cache, each start
    notes what it read, and the next one asks the kernel to read that (the entries, the tensors
    they do not replace) while the engine processes start and load, rather than at first use.
    ``0``: read on first use (e.g. a cache on a network file system whose bandwidth others
    need)."""
    return os.environ.get(REPACK_CACHE_READ_AHEAD_VARIABLE, "1") != "0"
