"""Load-time repacks kept on disk, so that only the first start of a checkpoint pays for them.

Why: vLLM's int4 experts kernel wants its own blocked layout, and its repack
(``convert_weight_packed_scale_zp``) took 16.1 of the 19.3 s of weight processing on the 4-layer
21B geometry (``benchmarks/profile_load.py``, docs/results/load-profile-4layers-w4a16-zen4.txt).

How: a repack's result is stored under the SHA-256 of everything that decides it: its kind, the
plugin's source, the vLLM, torch and CPU-tier it ran on, and its inputs, named one of two ways. For
a local checkpoint directory, by place (:class:`StoredRepackMethod`): the checkpoint's identity
(:func:`checkpoint_identity`: path, file names, sizes, inodes, modification and change times,
safetensors headers, JSON files) and the layer's place in it on this rank. Then a warm start knows
its entries before reading a tensor, and the model does not load the routed experts an entry
replaces (docs/notes/startup-breakdown.md); any write to the files makes a new identity.
Otherwise, or with ``VLLM_ERNIE_MOE_REPACK_CACHE_VERIFY=1``, by content: the bytes, dtypes and
shapes of the inputs (this rank's shard, as loaded), read and hashed at every start; such an entry
cannot be stale. A changed checkpoint, shard, kernel tier or version finds no entry and repacks.
Files are written whole under a temporary name and renamed, so a crash leaves no partial entry; an
unreadable entry is repacked and rewritten. Entries of environments no longer used are deleted
(:data:`_KEEP_ENVIRONMENTS`). ``VLLM_ERNIE_MOE_REPACK_CACHE`` (``envs.repack_cache_dir``) moves or
disables it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
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
#: Bytes per read-ahead request (:func:`read_ahead`). Linux caps one POSIX_FADV_WILLNEED at the
#: device's read-ahead window (8 MiB here, 128 KiB by default), and ignores the rest of the range.
_READ_AHEAD_CHUNK = 128 << 10
#: The note of the files the loading process imported (:func:`read_ahead_noted`).
_IMPORTS_NOTE = "imports"
#: A shared library's path: ``libx.so``, ``libx.so.1.0``, ``x.cpython-311-x86_64-linux-gnu.so``.
_SHARED_LIBRARY = re.compile(r"^/.*\.so(\.[0-9]+)*$")


@functools.cache
def _environment_digest() -> bytes:
    """What, besides the inputs, decides a repack: this plugin's code (its loading code decides
    the shard a place-keyed repack gets) and the libraries and kernel tier that run it."""
    import vllm

    import vllm_ernie_moe
    from vllm_ernie_moe import cpu_tier

    digest = hashlib.sha256()
    tier = cpu_tier.active()
    parts = (
        vllm.__version__,
        torch.__version__,
        tier.name if tier else "other",
        torch.backends.cpu.get_cpu_capability(),  # the ISA torch's packing kernels dispatch to
        vllm_ernie_moe.source_digest(),
    )
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.digest()


def _environment_dir(root: Path) -> Path:
    return root / _environment_digest().hex()[:16]


def _key(kind: str, inputs: Sequence[torch.Tensor], place: bytes | None = None) -> str:
    digest = hashlib.sha256(_environment_digest() + kind.encode())
    if place is not None:
        digest.update(b"place" + place)
        return digest.hexdigest()
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


def _entry(root: Path, kind: str, inputs: Sequence[torch.Tensor], place: bytes | None) -> Path:
    return _environment_dir(root) / f"{_key(kind, inputs, place)}.safetensors"


def cached_repack(
    kind: str,
    inputs: Sequence[torch.Tensor],
    repack: Callable[[], dict[str, torch.Tensor]],
    place: bytes | None = None,
) -> dict[str, torch.Tensor]:
    """``repack()``, or its result stored by an earlier start for the same ``inputs`` (for the
    same ``place`` in the same checkpoint, when given: :func:`layer_place`).

    ``kind`` names the repack and every setting it takes that is not in ``inputs`` (a group
    size, an algorithm); ``repack`` returns named CPU tensors. The cache never fails a load: a
    missing, damaged, unreadable or unwritable cache means repacking.
    """
    root = envs.repack_cache_dir()
    if root is None:
        return repack()
    path = _entry(root, kind, inputs, place)
    try:
        if path.is_file():
            tensors = load_file(path)
            _mark_used(path.parent)
            return tensors
    except Exception as error:  # a damaged or unreadable entry: repack and replace it
        logger.warning("Repack cache entry %s is unreadable (%s); repacking.", path, error)
    result = repack()
    _store(path, result)
    return result


def checkpoint_identity(model_dir: str | os.PathLike | None) -> bytes | None:
    """What identifies a local checkpoint directory without reading a tensor: its real path; each
    file's name, size, device, inode, and modification and change times (ns: a write changes the
    change time, which no one can set back); each safetensors file's header (tensor names, dtypes,
    shapes, offsets); each JSON file's text. None, so keyed by content, when the model is not a
    local directory of safetensors files, without a cache, or with
    ``VLLM_ERNIE_MOE_REPACK_CACHE_VERIFY=1``."""
    if envs.repack_cache_dir() is None or envs.repack_cache_keys_by_content():
        return None
    if not model_dir or not os.path.isdir(model_dir):
        return None
    directory = Path(model_dir).resolve()
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(path.suffix == ".safetensors" for path in files):
        return None  # e.g. weights streamed from object storage: not these files
    digest = hashlib.sha256(str(directory).encode())
    for path in files:
        stat = path.stat()
        digest.update(
            f"{path.name}|{stat.st_size}|{stat.st_dev}|{stat.st_ino}|{stat.st_mtime_ns}|"
            f"{stat.st_ctime_ns}|".encode()
        )
        if path.suffix == ".json":
            digest.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            digest.update(_safetensors_header(path, stat.st_size))
    return digest.digest()


def _safetensors_header(path: Path, size: int) -> bytes:
    """The header of a safetensors file: an 8-byte little-endian length, then that much JSON."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return file.read(min(length, size))


def layer_place(identity: bytes, name: str, layer: torch.nn.Module) -> bytes:
    """Where module ``name`` sits in the checkpoint of ``identity`` on this rank: what decides the
    shard it loads besides the files. Its parameters' names, shapes and dtypes, this rank's
    tensor- and expert-parallel ranks and sizes, and an expert-parallel layer's expert map."""
    from vllm.distributed import (
        get_ep_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    ep = get_ep_group()
    digest = hashlib.sha256(identity + name.encode())
    digest.update(
        f"tp {get_tensor_model_parallel_rank()}/{get_tensor_model_parallel_world_size()} "
        f"ep {ep.rank_in_group}/{ep.world_size}".encode()
    )
    for parameter_name, parameter in layer.named_parameters(recurse=False):
        digest.update(f"{parameter_name}{tuple(parameter.shape)}{parameter.dtype}".encode())
    expert_map = getattr(layer, "expert_map", None)
    if isinstance(expert_map, torch.Tensor):
        digest.update(expert_map.cpu().contiguous().numpy().tobytes())
    return digest.digest()


class StoredRepackMethod:
    """A quant method whose load-time repack is keyed by its layer's place in an identified
    checkpoint (:func:`assign_places`), and whose stored repack may replace some of the layer's
    checkpoint tensors, which a warm start then does not load."""

    #: The layer's place (:func:`layer_place`); None: keyed by content.
    repack_place: bytes | None = None
    #: The stored repack that replaces this layer's :attr:`replaced_by_repack`, which were then
    #: not loaded; None: the layer loads them.
    served_entry: Path | None = None
    #: The layer's parameters that its repack replaces whole; empty: it loads them anyway.
    replaced_by_repack: tuple[str, ...] = ()

    def repack_kind(self) -> str | None:
        """``cached_repack``'s kind for this layer; None when it makes no stored repack."""
        return None

    def stored_or_repacked(
        self,
        inputs: Sequence[torch.Tensor],
        repack: Callable[[], dict[str, torch.Tensor]],
        kind: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """This layer's repack: the stored one it was served (its inputs were not loaded), or
        :func:`cached_repack`'s. ``kind``: another stored repack of the layer, of tensors a
        start may never touch: it is mapped, never read ahead (only :meth:`repack_kind`'s
        entry is noted), and never served in place of loading."""
        if kind is not None:
            return cached_repack(kind, inputs, repack, self.repack_place)
        if self.served_entry is not None:
            return _load_served(self.served_entry)
        kind = self.repack_kind()
        assert kind is not None
        return cached_repack(kind, inputs, repack, self.repack_place)


def assign_places(model: torch.nn.Module, checkpoint_dir: str | None) -> dict[str, tuple[str, ...]]:
    """Before loading: key each :class:`StoredRepackMethod` layer of ``model`` by its place in
    ``checkpoint_dir``, and serve those whose repack is stored from the cache. Returns module
    name -> the parameters the cache serves it (not to be loaded). ``None`` (a weight update,
    dummy or streamed weights) keys every layer by content and serves none."""
    identity = checkpoint_identity(checkpoint_dir)  # None without a cache
    served: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if not isinstance(method, StoredRepackMethod):
            continue
        method.repack_place = None if identity is None else layer_place(identity, name, module)
        method.served_entry = None
        kind = method.repack_kind()
        if method.repack_place is None or kind is None or not method.replaced_by_repack:
            continue
        entry = _entry(envs.repack_cache_dir(), kind, (), method.repack_place)
        if _readable(entry):
            method.served_entry = entry
            served[name] = method.replaced_by_repack
    if served:
        root = envs.repack_cache_dir()
        _mark_used(_environment_dir(root))
        logger.info(
            "Repack cache: %d layers served from %s; their checkpoint tensors are not read "
            "(%s=1 keys by content instead).",
            len(served),
            root,
            envs.REPACK_CACHE_VERIFY_VARIABLE,
        )
    return served


#: A stretch of a file to read ahead: path, first byte, bytes (0: to the end).
Stretch = tuple[Path, int, int]


def note_reads(
    model: torch.nn.Module,
    checkpoint_dir: str | None,
    not_read: tuple[str, ...],
    checkpoint_module: Callable[[str], str],
) -> None:
    """At a load keyed by place (after :func:`assign_places`), read ahead what this rank reads:
    the checkpoint's tensors but those under ``not_read`` (served), then the stored entries. And
    note, for the next start's :func:`read_ahead_noted`, what that start will read: the tensors
    of the layers that have no entry to replace them (a cold start stores them), the entries.
    ``checkpoint_module`` names a module as the checkpoint's tensor names do."""
    identity = checkpoint_identity(checkpoint_dir)
    if identity is None or not envs.repack_cache_read_ahead():
        return
    from vllm.distributed import get_pp_group, get_tp_group

    entries: list[Stretch] = []
    replaced: list[str] = []  # what a warm start does not read
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, StoredRepackMethod) and method.repack_place is not None:
            kind = method.repack_kind()
            if kind is not None:
                entries.append(
                    (_entry(envs.repack_cache_dir(), kind, (), method.repack_place), 0, 0)
                )
                if method.replaced_by_repack:
                    replaced.append(f"{checkpoint_module(name)}.")
    directory = Path(checkpoint_dir).resolve()
    _start_reading_ahead([], _checkpoint_stretches(directory, not_read) + entries)
    tp, pp = get_tp_group(), get_pp_group()
    notes = _notes(identity, tp.world_size, pp.world_size)
    next_reads = _checkpoint_stretches(directory, tuple(replaced)) + entries
    text = "".join(f"{offset} {length} {path}\n" for path, offset, length in next_reads)
    _write_note(notes / f"tp{tp.rank_in_group}-pp{pp.rank_in_group}", text)
    # Listing ~10,000 imported files takes a few tenths of a second: beside the load, not in it.
    threading.Thread(target=_note_imports, args=(notes / _IMPORTS_NOTE,), daemon=True).start()


def read_ahead_noted(model_dir: str, tensor_parallel: int, pipeline_parallel: int) -> None:
    """In the process that builds the engine's config, before any engine process starts: read
    ahead what the last start of this checkpoint on this layout read (:func:`note_reads`, every
    rank's notes), while vLLM starts its engine processes and they import. First, whole, the
    files the loading process imported that this one has not: an engine process's imports read
    them a page at a time, each read waiting behind the weights' (imports 10.7 and 11.6 s instead of
    12.3-13.4 s; 7.1-7.2 s with storage idle, docs/results/read-ahead-imports-zen4.txt)."""
    identity = checkpoint_identity(model_dir)
    if identity is None or not envs.repack_cache_read_ahead():
        return
    notes = _notes(identity, tensor_parallel, pipeline_parallel)
    stretches: list[Stretch] = []
    imports: list[Path] = []
    with contextlib.suppress(OSError, ValueError):  # no notes yet, or damaged: read on first use
        for rank in sorted(notes.glob("tp*-pp*")):
            for line in rank.read_text().splitlines():
                offset, length, path = line.split(" ", 2)
                stretches.append((Path(path), int(offset), int(length)))
        imports = [Path(f) for f in (notes / _IMPORTS_NOTE).read_text().split("\n") if f]
    if stretches:
        logger.info("Repack cache: reading ahead what the last start of %s read.", model_dir)
        _start_reading_ahead(imports, stretches)


def _notes(identity: bytes, tensor_parallel: int, pipeline_parallel: int) -> Path:
    layout = f"tp {tensor_parallel} pp {pipeline_parallel}".encode()
    name = hashlib.sha256(identity + layout).hexdigest()[:32]
    return _environment_dir(envs.repack_cache_dir()) / "read-ahead" / name


def _checkpoint_stretches(directory: Path, not_read: tuple[str, ...]) -> list[Stretch]:
    """The byte stretches of the checkpoint's tensors but those under ``not_read``, in file
    order, neighbours merged."""
    stretches: list[Stretch] = []
    for path in sorted(directory.glob("*.safetensors")):
        header_text = _safetensors_header(path, path.stat().st_size)
        header, start = json.loads(header_text), 8 + len(header_text)
        spans = sorted(
            tuple(info["data_offsets"])
            for name, info in header.items()
            if name != "__metadata__" and not name.startswith(not_read)
        )
        for begin, end in spans:
            if stretches and stretches[-1][0] == path and sum(stretches[-1][1:]) == start + begin:
                stretches[-1] = (path, stretches[-1][1], stretches[-1][2] + end - begin)
            else:
                stretches.append((path, start + begin, end - begin))
    return stretches


def _imported_files() -> list[str]:
    """The files this process has imported: its modules' sources and bytecode, and the shared
    libraries it maps (extension modules among them; Linux only). Not the other files it maps:
    the loader maps checkpoint shards and repack entries, whose stretches :func:`note_reads`
    notes; listed here, a warm start read a 2.15 GB shard whole for its 1.18 GB of stretches."""
    files: dict[str, None] = {}
    for module in list(sys.modules.values()):
        attributes = getattr(module, "__dict__", {})  # not getattr: lazy modules would import
        for attribute in ("__file__", "__cached__"):
            path = attributes.get(attribute)
            if isinstance(path, str) and os.path.isfile(path):
                files[os.path.realpath(path)] = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = "".join(line.split(maxsplit=5)[5:]).strip()
            if _SHARED_LIBRARY.search(path) and os.path.isfile(path):
                files[os.path.realpath(path)] = None
    return list(files)


def _note_imports(path: Path) -> None:
    _write_note(path, "".join(f"{file}\n" for file in _imported_files()))


def _write_note(path: Path, text: str) -> None:
    """Write a read-ahead note whole (optional, as the cache is: errors are ignored)."""
    with contextlib.suppress(OSError):
        if path.is_file() and path.read_text() == text:
            return
        _environment_made(path.parents[2])
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)


def _start_reading_ahead(files: Sequence[Path], stretches: Sequence[Stretch]) -> None:
    threading.Thread(target=read_ahead, args=(files, stretches), daemon=True).start()


def read_ahead(files: Sequence[Path], stretches: Sequence[Stretch]) -> None:
    """Ask the kernel to read ``stretches`` into the page cache, in order, without waiting for it.

    Why: with the page cache cold, a start waited on storage in turns: the checkpoint's tensors
    while loading, the entries (memory mapped) a fault at a time in the warm-up and the first
    request, with storage idle in between (imports, the KV cache, the compilation's load). The
    requests return at once. ``files`` are read whole first, before any request, but for those
    this process has imported itself (see :func:`read_ahead_noted`). Only a hint: errors are
    ignored, and a system without ``posix_fadvise`` (macOS) reads on first use.
    """
    loaded = set(_imported_files()) if files else set()  # here, not on the caller's path
    for path in (file for file in files if str(file) not in loaded):
        with contextlib.suppress(OSError), path.open("rb", buffering=0) as file:
            while file.read(_READ_AHEAD_CHUNK):
                pass
    if not hasattr(os, "posix_fadvise"):
        return
    for path, offset, length in stretches:
        with contextlib.suppress(OSError):
            descriptor = os.open(path, os.O_RDONLY)
            try:
                end = offset + length if length else os.fstat(descriptor).st_size
                for start in range(offset, end, _READ_AHEAD_CHUNK):
                    size = min(_READ_AHEAD_CHUNK, end - start)
                    os.posix_fadvise(descriptor, start, size, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)


#: Checkpoint tensor-name prefixes the load under way does not read (:func:`not_reading`).
_not_read: tuple[str, ...] = ()


@contextlib.contextmanager
def not_reading(prefixes: tuple[str, ...]) -> Iterator[None]:
    """While the model loads: vLLM's weights iterator skips the tensors under ``prefixes``
    (served from the cache) before it maps them (``patches/patch_should_skip_weight.py``):
    creating a tensor of a memory-mapped file touches its first page, which reads the disk's
    read-ahead around it."""
    global _not_read
    outer, _not_read = _not_read, prefixes
    try:
        yield
    finally:
        _not_read = outer


def is_not_read(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is served from the cache in the load under way."""
    return name.startswith(_not_read)


def _readable(entry: Path) -> bool:
    try:
        with safe_open(entry, "pt") as tensors:
            return bool(tensors.keys())
    except Exception:  # missing or damaged: the layer loads and repacks
        return False


def _load_served(path: Path) -> dict[str, torch.Tensor]:
    """The entry :func:`assign_places` found before loading. Its layer's inputs were not loaded,
    so an entry that has become unreadable since cannot be repacked: it is deleted and the load
    fails with what to do."""
    try:
        return load_file(path)
    except Exception as error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise RuntimeError(
            f"Repack cache entry {path} was readable before the weights were loaded and is not "
            f"now ({error}); its layer's checkpoint tensors were not loaded. Start again: the "
            f"entry is deleted and the next start repacks. If another process cleans "
            f"{path.parent.parent} while engines start, set {envs.REPACK_CACHE_VARIABLE} to a "
            "directory of this engine's own."
        ) from error


def _mark_used(environment: Path) -> None:
    """This environment was used last (pruning keeps it); a read-only cache still serves."""
    with contextlib.suppress(OSError):
        os.utime(environment)


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


def _environment_made(environment: Path) -> None:
    """Create an environment's directory; the first time, delete older environments' entries."""
    if not environment.is_dir():
        environment.mkdir(parents=True, exist_ok=True)  # tensor-parallel ranks race here
        _prune_environments(environment.parent, environment)


def _store(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _environment_made(path.parent)
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
