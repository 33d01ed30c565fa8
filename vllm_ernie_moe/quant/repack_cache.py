"""Load-time repacks kept on disk, so that only the first start of a checkpoint pays for them.

Why: vLLM's int4 experts kernel wants its own blocked layout, and its repack
(``convert_weight_packed_scale_zp``) took 16.1 of the 19.3 s of weight processing on the 4-layer
21B geometry (``benchmarks/profile_load.py``, docs/results/load-profile-4layers-w4a16-zen4.txt).

How: a repack's result is stored under the SHA-256 of everything that decides it: the bytes,
dtypes and shapes of its inputs (this rank's shard, as loaded), its kind, the plugin's quantization
source, and the vLLM, torch and CPU-tier it ran on. A changed checkpoint, shard, kernel tier or
version therefore finds no entry and repacks; an entry cannot be stale. Files are written whole
under a temporary name and renamed, so a crash leaves no partial entry; an unreadable entry is
repacked and rewritten. Entries of environments no longer used are deleted
(:data:`_KEEP_ENVIRONMENTS`). ``VLLM_ERNIE_MOE_REPACK_CACHE`` (``envs.repack_cache_dir``) moves or
disables it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from vllm.logger import init_logger

from vllm_ernie_moe import envs

logger = init_logger(f"vllm.{__name__}")

#: Free space an entry must leave on the cache's file system.
_FREE_SPACE_MARGIN = 2 << 30
#: Environments (plugin source, vLLM, torch, tier) whose entries are kept: the two used last, e.g.
#: two vLLM versions on one machine. An older one's entries can never be read again (their key
#: includes the environment), so the first entry of a new environment deletes them.
_KEEP_ENVIRONMENTS = 2
#: Bytes per hashed chunk of a repack's input: large enough that hashlib drops the GIL and the
#: threads' start-up is noise, small enough to share a layer's experts (~100 MB) over the cores.
_HASH_CHUNK = 16 << 20
#: Directory names of environments (16 hex digits): pruning touches nothing else under the root.
_ENVIRONMENT_NAME = re.compile(r"[0-9a-f]{16}")


@functools.cache
def _environment_digest() -> bytes:
    """What, besides the inputs, decides a repack: this plugin's quantization code and the
    libraries and kernel tier that run it."""
    import vllm

    from vllm_ernie_moe import cpu_tier, portable_kernels

    digest = hashlib.sha256()
    tier = cpu_tier.active()
    parts = (
        vllm.__version__,
        torch.__version__,
        tier.name if tier else "other",
        torch.backends.cpu.get_cpu_capability(),  # the ISA torch's packing kernels dispatch to
    )
    for part in parts:
        digest.update(part.encode() + b"\0")
    sources = sorted(Path(__file__).parent.glob("*.py")) + [Path(portable_kernels.__file__)]
    for source in sources:
        digest.update(source.read_bytes())
    return digest.digest()


def _environment_dir(root: Path) -> Path:
    return root / _environment_digest().hex()[:16]


def _key(kind: str, inputs: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256(_environment_digest() + kind.encode())
    for tensor in inputs:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(_content_digest(tensor))
    return digest.hexdigest()


def _content_digest(tensor: torch.Tensor) -> bytes:
    """The SHA-256 of each :data:`_HASH_CHUNK` bytes of ``tensor``, hashed on every core this
    process may use (hashlib releases the GIL): on one thread, hashing a warm start's inputs took
    about as long as reading them (docs/notes/startup-breakdown.md). Fixed chunks keep the key
    independent of the core count."""
    from vllm.platforms.cpu import get_max_threads  # the cores this process may run on

    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    chunks = [data[start : start + _HASH_CHUNK] for start in range(0, len(data), _HASH_CHUNK)]
    with ThreadPoolExecutor(max(1, min(len(chunks), get_max_threads()))) as pool:
        return b"".join(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))


def cached_repack(
    kind: str,
    inputs: Sequence[torch.Tensor],
    repack: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``repack()``, or its result stored by an earlier start for the same ``inputs``.

    ``kind`` names the repack and every setting it takes that is not in ``inputs`` (a group
    size, an algorithm); ``repack`` returns named CPU tensors. The cache never fails a load: a
    missing, damaged, unreadable or unwritable cache means repacking.
    """
    root = envs.repack_cache_dir()
    if root is None:
        return repack()
    path = _environment_dir(root) / f"{_key(kind, inputs)}.safetensors"
    try:
        if path.is_file():
            tensors = load_file(path)
            with contextlib.suppress(OSError):  # a read-only cache still serves
                os.utime(path.parent)  # this environment was used last
            return tensors
    except Exception as error:  # a damaged or unreadable entry: repack and replace it
        logger.warning("Repack cache entry %s is unreadable (%s); repacking.", path, error)
    result = repack()
    _store(path, result)
    return result


def _prune_environments(root: Path, current: Path) -> None:
    """Delete the entries of environments beyond the :data:`_KEEP_ENVIRONMENTS` used last; only
    directories named as :func:`_environment_dir` names them (the root may hold other things)."""
    others = [d for d in root.iterdir() if _ENVIRONMENT_NAME.fullmatch(d.name) and d != current]
    others.sort(key=_modified, reverse=True)
    for stale in others[_KEEP_ENVIRONMENTS - 1 :]:
        logger.info("Repack cache: deleting %s (entries of an older plugin/vLLM/torch).", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _modified(directory: Path) -> float:
    try:
        return directory.stat().st_mtime
    except OSError:  # deleted by another process meanwhile
        return 0.0


def _store(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        created = not path.parent.is_dir()
        path.parent.mkdir(parents=True, exist_ok=True)  # tensor-parallel ranks race here
        if created:
            _prune_environments(path.parent.parent, path.parent)
        if shutil.disk_usage(path.parent).free < size + _FREE_SPACE_MARGIN:
            _warn_once(f"less than {(size + _FREE_SPACE_MARGIN) >> 20} MiB free")
            return
        save_file({name: t.contiguous() for name, t in tensors.items()}, temporary)
        os.replace(temporary, path)
    except Exception as error:  # optional: a full disk or a permission never fails the load
        _warn_once(str(error))
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


_warned = False


def _warn_once(reason: str) -> None:
    """One warning per process: a cache that cannot be written fails the same way for every
    entry."""
    global _warned
    if _warned:
        return
    _warned = True
    logger.warning(
        "Repack cache %s not written (%s): the next start repacks again. Set %s to a writable "
        "directory with room, or to 'off'.",
        envs.repack_cache_dir(),
        reason,
        envs.REPACK_CACHE_VARIABLE,
    )
