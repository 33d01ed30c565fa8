"""Reading ahead what a start will read, from notes the last start left
(``quant/repack_cache.py`` writes them). Without torch or vLLM, so that the ``.pth`` start hook of
``vllm serve`` (``engine_core_server.py``) can begin it at the interpreter's first line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

#: A stretch of a file to read ahead: path, first byte, bytes (0: to the end).
Stretch = tuple[Path, int, int]
#: Bytes per read-ahead request (:func:`read_ahead`). Linux caps one POSIX_FADV_WILLNEED at the
#: device's read-ahead window (8 MiB here, 128 KiB by default), and ignores the rest of the range.
CHUNK = 128 << 10
#: The note of the files the loading process imported, in a notes directory.
IMPORTS_NOTE = "imports"
#: A shared library's path: ``libx.so``, ``libx.so.1.0``, ``x.cpython-311-x86_64-linux-gnu.so``.
SHARED_LIBRARY = re.compile(r"^/.*\.so(\.[0-9]+)*$")


def noted(notes: Path) -> tuple[list[Path], list[Stretch]]:
    """What a notes directory says to read: the imported files, and every rank's stretches
    (``tp<r>-pp<r>`` files of ``offset length path`` lines). Nothing for missing or damaged
    notes."""
    stretches: list[Stretch] = []
    imports: list[Path] = []
    with contextlib.suppress(OSError, ValueError):  # no notes yet, or damaged: read on first use
        for rank in sorted(notes.glob("tp*-pp*")):
            for line in rank.read_text().splitlines():
                offset, length, path = line.split(" ", 2)
                stretches.append((Path(path), int(offset), int(length)))
        imports = [Path(f) for f in (notes / IMPORTS_NOTE).read_text().split("\n") if f]
    return imports, stretches


def start(files: Sequence[Path], stretches: Sequence[Stretch]) -> None:
    """:func:`read_ahead` from a thread of its own: the caller goes on at once."""
    threading.Thread(target=read_ahead, args=(files, stretches), daemon=True).start()


def imported_files() -> list[str]:
    """The files this process has imported: its modules' sources and bytecode, and the shared
    libraries it maps (extension modules among them; Linux only). Not the other files it maps:
    the loader maps checkpoint shards and repack entries, whose stretches
    ``repack_cache.note_reads`` notes; listed here, a warm start read a 2.15 GB shard whole for
    its 1.18 GB of stretches."""
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
            if SHARED_LIBRARY.search(path) and os.path.isfile(path):
                files[os.path.realpath(path)] = None
    return list(files)


def read_ahead(files: Sequence[Path], stretches: Sequence[Stretch]) -> None:
    """Ask the kernel to read ``stretches`` into the page cache, in order, without waiting for it.

    Why: with the page cache cold, a start waited on storage in turns: the checkpoint's tensors
    while loading, the entries (memory mapped) a fault at a time in the warm-up and the first
    request, with storage idle in between (imports, the KV cache, the compilation's load). The
    requests return at once. ``files`` are read whole first, before any request, but for those
    this process has imported itself (see ``repack_cache.read_ahead_noted``). Only a hint: errors
    are ignored, and a system without ``posix_fadvise`` (macOS) reads on first use.
    """
    loaded = set(imported_files()) if files else set()  # here, not on the caller's path
    for path in (file for file in files if str(file) not in loaded):
        with contextlib.suppress(OSError), path.open("rb", buffering=0) as file:
            while file.read(CHUNK):
                pass
    if not hasattr(os, "posix_fadvise"):
        return
    for path, offset, length in stretches:
        with contextlib.suppress(OSError):
            descriptor = os.open(path, os.O_RDONLY)
            try:
                end = offset + length if length else os.fstat(descriptor).st_size
                for start in range(offset, end, CHUNK):
                    size = min(CHUNK, end - start)
                    os.posix_fadvise(descriptor, start, size, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)
