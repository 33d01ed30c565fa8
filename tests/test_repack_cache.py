"""The repack cache (``vllm_ernie_moe/quant/repack_cache.py``): an entry is served only for the
same input bytes, dtypes, shapes and kind, holds exactly what the repack returned (checked against
vLLM's own int4 experts repack, called directly), and a damaged, unwritable or disabled cache
falls back to repacking. Keyed by a local checkpoint's identity, a warm engine start is served
the routed experts without loading them, and a changed checkpoint repacks."""

import ctypes
import json
import mmap
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from reference import (
    check_logprobs_close,
    dequantized_checkpoint,
    fake_quantize_activations,
    logprob_drift,
    transformers_greedy,
    vllm_greedy,
)
from safetensors import safe_open
from safetensors.torch import save_file
from settings import ONE_PROCESS

from vllm_ernie_moe import envs
from vllm_ernie_moe.quant import repack_cache
from vllm_ernie_moe.quant.cpu_experts import vllm_kernel_serves

W4A16 = Path(__file__).parent / "fixtures" / "ernie-tiny-w4a16-msmodelslim"
MAX_TOKENS, TOP_K = 16, 5


class CountingRepack:
    """A repack (int8 rows -> transposed int32 + a sum) that counts its calls."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.calls = weight, 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"columns": self.weight.T.to(torch.int32).contiguous(),
                "sums": self.weight.sum(dim=1, dtype=torch.int64)}  # fmt: skip


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "repack"
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, str(directory))
    return directory


def weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (64, 96), dtype=torch.int8, generator=generator)


def test_second_call_loads_what_the_first_stored(cache_dir):
    w = weight()
    repack = CountingRepack(w)
    first = repack_cache.cached_repack("test-kind", [w], repack)
    second = repack_cache.cached_repack("test-kind", [w.clone()], repack)
    assert repack.calls == 1
    assert len(list(cache_dir.rglob("*.safetensors"))) == 1
    assert not list(cache_dir.rglob(".*"))  # no temporary file left
    expected = {"columns": w.T.to(torch.int32), "sums": w.sum(dim=1, dtype=torch.int64)}
    for result in (first, second):
        assert result.keys() == expected.keys()
        for name, tensor in expected.items():
            assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor)


def test_other_bytes_dtype_shape_or_kind_miss(cache_dir):
    w = weight()
    repack = CountingRepack(w)
    repack_cache.cached_repack("test-kind", [w], repack)
    changed = w.clone()
    changed[17, 3] += 1
    for kind, inputs in (
        ("test-kind", [changed]),  # one byte differs
        ("test-kind", [w.view(torch.uint8)]),  # same bytes, other dtype
        ("test-kind", [w.reshape(96, 64)]),  # same bytes, other shape
        ("other-kind", [w]),  # e.g. another group size
    ):
        calls = repack.calls
        repack_cache.cached_repack(kind, inputs, repack)
        assert repack.calls == calls + 1, (kind, inputs[0].dtype, inputs[0].shape)


def test_inputs_of_several_hash_chunks_key_by_every_byte_on_any_core_count(monkeypatch):
    """Inputs larger than a hash chunk are hashed in chunks on several threads: a byte in the
    last chunk still changes the key, and one core or two give the same key."""
    large = torch.zeros(3 * repack_cache._HASH_CHUNK + 5, dtype=torch.int8)
    changed = large.clone()
    changed[-1] = 1
    assert repack_cache._key("test-kind", [large]) != repack_cache._key("test-kind", [changed])
    keys = set()
    for cores in ({0}, {0, 1}):
        monkeypatch.setattr(repack_cache.os, "sched_getaffinity", lambda _, cores=cores: cores)
        keys.add(repack_cache._key("test-kind", [large]))
    assert len(keys) == 1


def test_damaged_entry_is_repacked_and_replaced(cache_dir, caplog):
    w = weight()
    repack = CountingRepack(w)
    repack_cache.cached_repack("test-kind", [w], repack)
    (entry,) = cache_dir.rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    result = repack_cache.cached_repack("test-kind", [w], repack)
    assert repack.calls == 2
    assert torch.equal(result["columns"], w.T.to(torch.int32))
    assert "unreadable" in caplog.text
    repack_cache.cached_repack("test-kind", [w], repack)
    assert repack.calls == 2  # the rewritten entry serves


@pytest.mark.parametrize("setting", ["off", "0"])
def test_disabled(monkeypatch, tmp_path, setting):
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, setting)
    w = weight()
    repack = CountingRepack(w)
    for _ in range(2):
        repack_cache.cached_repack("test-kind", [w], repack)
    assert repack.calls == 2


def test_unwritable_directory_still_repacks(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, str(blocker / "repack"))
    monkeypatch.setattr(repack_cache, "_warned", False)
    w = weight()
    result = repack_cache.cached_repack("test-kind", [w], CountingRepack(w))
    assert torch.equal(result["sums"], w.sum(dim=1, dtype=torch.int64))
    assert envs.REPACK_CACHE_VARIABLE in caplog.text


def test_vllm_int4_experts_repack_round_trips(cache_dir):
    """The entry of the int4 experts repack the W4A8/W4A16 methods cache is byte for byte what
    vLLM's ``prepare_int4_moe_layer_for_cpu`` returns when called directly."""
    from vllm._custom_ops import CPUQuantAlgo

    if not hasattr(torch.ops._C, "convert_weight_packed_scale_zp"):
        pytest.skip("vLLM's int4 experts repack is in its AVX-512 BF16 library only")
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        prepare_int4_moe_layer_for_cpu,
    )

    generator = torch.Generator().manual_seed(1)
    experts, hidden, intermediate, group = 2, 256, 128, 64
    w13 = torch.randint(0, 2**31 - 1, (experts, hidden // 8, 2 * intermediate),
                        dtype=torch.int32, generator=generator)  # fmt: skip
    w2 = torch.randint(0, 2**31 - 1, (experts, intermediate // 8, hidden),
                       dtype=torch.int32, generator=generator)  # fmt: skip
    s13 = torch.rand(experts, hidden // group, 2 * intermediate, generator=generator)
    s2 = torch.rand(experts, intermediate // group, hidden, generator=generator)
    names = ("w13", "w2", "s13", "s2", "z13", "z2")

    def repack():
        blocked = prepare_int4_moe_layer_for_cpu(w13, w2, s13, s2, quant_algo=CPUQuantAlgo.GPTQ)
        return dict(zip(names, blocked))

    repack_cache.cached_repack("int4", [w13, w2, s13, s2], repack)
    loaded = repack_cache.cached_repack("int4", [w13, w2, s13, s2], lambda: pytest.fail("miss"))
    for name, tensor in repack().items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_int8_lm_head_quantized_at_load_is_stored(cache_dir, monkeypatch):
    """The int8 lm_head's quantization at load (2.6 s of a warm 28-layer start) is served from
    the cache the second time, equal to per-row int8 computed here by hand (in bf16, as
    msModelSlim computes it for a bf16 weight)."""
    from vllm_ernie_moe.quant import linear

    generator = torch.Generator().manual_seed(1)
    head = torch.randn(64, 96, generator=generator).to(torch.bfloat16)
    scale = head.abs().amax(dim=1, keepdim=True) / 127
    expected = torch.clamp(torch.round(head / scale), -128, 127).to(torch.int8)

    def processed() -> torch.nn.Module:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
        method = linear.ErnieW8A8LinearMethod(prequantized=False)
        method.kernel = None  # the portable GEMM's layout: the stored tensors as they are
        method.process_weights_after_loading(layer)
        return layer

    first = processed()
    monkeypatch.setattr(linear, "quantize_rows", lambda *_: pytest.fail("quantized again"))
    second = processed()
    for layer in (first, second):
        assert torch.equal(layer.weight, expected)
        assert torch.equal(layer.weight_scale, scale.float().view(-1))
    assert len(list(cache_dir.glob("*/*.safetensors"))) == 1


def test_int8_lm_head_is_stored_in_the_sgl_gemm_layout_and_not_packed_again(cache_dir, monkeypatch):
    """Where vLLM's sgl int8 GEMM takes the head, the entry holds its packed layout (packing it
    at every start took 0.48 s for the 21B's head) and the head computes with it: against per-row
    int8 by hand times the input (quantized per token inside the kernel: ~1% apart)."""
    from vllm_ernie_moe.quant import linear
    from vllm_ernie_moe.quant.int4 import int8_copy_fits

    rows, inputs = 64, 96
    if not int8_copy_fits(rows, inputs):
        pytest.skip("vLLM's sgl int8 GEMM is not in this build (AVX2)")
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
    scale = head.abs().amax(dim=1, keepdim=True) / 127  # in bf16, as msModelSlim computes it
    expected = torch.clamp(torch.round(head / scale), -128, 127).to(torch.int8)
    scale = scale.float()

    def processed() -> tuple[torch.nn.Module, linear.ErnieW8A8LinearMethod]:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
        method = linear.ErnieW8A8LinearMethod(prequantized=False)
        method.kernel, method.stores_sgl_layout = "vLLM's", True  # as create_weights finds them
        method.process_weights_after_loading(layer)
        return layer, method

    first = processed()
    monkeypatch.setattr(linear, "sgl_int8_packed", lambda *_: pytest.fail("packed again"))
    monkeypatch.setattr(linear, "quantize_rows", lambda *_: pytest.fail("quantized again"))
    second = processed()
    x = torch.randn(5, inputs, generator=generator).to(torch.bfloat16)
    reference = x.float() @ (expected.float() * scale).T
    for layer, method in (first, second):
        assert torch.equal(layer.weight, torch.ops._C.convert_weight_packed(expected))
        assert torch.equal(layer.weight_scale, scale.view(-1))
        got = method.apply(layer, x).float()
        assert (got - reference).norm() / reference.norm() < 0.02
    assert len(list(cache_dir.glob("*/*.safetensors"))) == 1


def test_a_new_environment_keeps_only_the_last_used_other(cache_dir, monkeypatch):
    """Entries of another plugin/vLLM/torch/tier are never read again: the first entry of a new
    environment deletes all but the most recently used other environment's."""
    w = weight()

    def use(environment: bytes, repack) -> None:
        monkeypatch.setattr(repack_cache, "_environment_digest", lambda: environment)
        repack_cache.cached_repack("test-kind", [w], repack)

    a, b, c = (letter * 8 for letter in (b"a", b"b", b"c"))  # 16 hex digits, as real ones
    for index, environment in enumerate((a, b)):
        use(environment, CountingRepack(w))
        os.utime(repack_cache._environment_dir(cache_dir), (index, index))
    use(a, lambda: pytest.fail("a's entry was deleted"))  # a hit: "a" is now used last
    use(c, CountingRepack(w))
    assert {d.name for d in cache_dir.iterdir()} == {a.hex(), c.hex()}


def test_read_ahead_notes_in_a_new_environment_prune_as_an_entry_does(cache_dir, monkeypatch):
    """A cold start writes its read-ahead notes before it stores an entry."""
    for index, environment in enumerate((b"a" * 8, b"b" * 8, b"c" * 8)):
        monkeypatch.setattr(repack_cache, "_environment_digest", lambda e=environment: e)
        notes = repack_cache._notes(b"checkpoint", 1, 1)
        repack_cache._write_note(notes / "tp0-pp0", "0 0 /nowhere\n")
        assert (notes / "tp0-pp0").read_text() == "0 0 /nowhere\n"
        os.utime(repack_cache._environment_dir(cache_dir), (index, index))
    assert {d.name for d in cache_dir.iterdir()} == {(b"b" * 8).hex(), (b"c" * 8).hex()}


def test_pruning_leaves_other_directories_under_the_root_alone(cache_dir, monkeypatch):
    """``VLLM_ERNIE_MOE_REPACK_CACHE`` may name a directory that holds other things."""
    for name in ("models", "0123456789abcdeg", "notes.txt"):
        (cache_dir / name).mkdir(parents=True)
    for environment in (b"a" * 8, b"b" * 8, b"c" * 8):
        monkeypatch.setattr(repack_cache, "_environment_digest", lambda e=environment: e)
        repack_cache.cached_repack("test-kind", [weight()], CountingRepack(weight()))
    names = {d.name for d in cache_dir.iterdir()}
    assert {"models", "0123456789abcdeg", "notes.txt"} <= names
    assert (b"a" * 8).hex() not in names  # but old environments go


def test_a_read_only_cache_still_serves(cache_dir, monkeypatch):
    w = weight()
    repack_cache.cached_repack("test-kind", [w], CountingRepack(w))

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(repack_cache.os, "utime", refuse)
    repack_cache.cached_repack("test-kind", [w], lambda: pytest.fail("a served entry repacked"))


def test_a_failing_write_never_fails_the_load(cache_dir, monkeypatch, caplog):
    """safetensors reports a full disk as its own error type, not OSError."""

    def full_disk(*args, **kwargs):
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(repack_cache, "save_file", full_disk)
    monkeypatch.setattr(repack_cache, "_warned", False)
    w = weight()
    result = repack_cache.cached_repack("test-kind", [w], CountingRepack(w))
    assert torch.equal(result["sums"], w.sum(dim=1, dtype=torch.int64))
    assert "No space left" in caplog.text
    assert not list(cache_dir.rglob("*.tmp")) and not list(cache_dir.rglob("*.safetensors"))


def _resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache, as the kernel's mincore(2) reports it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)  # fmt: skip
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(byte & 1 for byte in vector) / pages


def test_read_ahead_brings_every_page_into_memory(tmp_path):
    """A stretch is read ahead whole, not only the first read-ahead window that one
    POSIX_FADV_WILLNEED of the whole file reads (8 MiB on this machine's disk, 128 KiB by
    default: a quarter of these files at most), and so is a file to read first: residency as
    mincore(2) reports it, after the files' pages were dropped. The kernel may drop read-ahead
    under memory pressure, hence the margins."""
    entries = [tmp_path / f"entry{index}.safetensors" for index in range(3)]
    for entry in entries:
        entry.write_bytes(os.urandom(32 << 20))
    for entry in entries:
        with entry.open("rb") as file:
            os.fsync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if max(_resident_fraction(entry) for entry in entries) > 0.1:
        pytest.skip(f"{tmp_path}'s file system keeps its pages (tmpfs): nothing to read ahead")
    repack_cache.read_ahead(entries[:1], [(entries[1], 0, 0), (entries[2], 4096, 24 << 20)])
    deadline = time.monotonic() + 30  # the stretch is asked for after the whole file: wait for both
    while (_resident_fraction(entries[1]) < 1 or _resident_fraction(entries[2]) < 0.75) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    first, whole, stretch = map(_resident_fraction, entries)
    assert first > 0.9 and whole > 0.9, (first, whole)
    assert 0.5 < stretch < 1, stretch  # the stretch (24 of 32 MiB) and no more


def test_the_imports_note_lists_code_not_the_data_files_the_process_maps(tmp_path):
    """What a start reads whole before the weights (:func:`read_ahead_noted`) is the code the
    engine process imported: modules and shared libraries, not the checkpoint shard or entry it
    has mapped while the note is taken (a 2.15 GB shard was, of which a warm start needs 1.18
    GB). The mapping is checked in /proc/self/maps, not by the code under test."""
    shard = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"weight": torch.zeros(1 << 16)}, shard)
    with safe_open(shard, "pt") as tensors:
        tensors.get_tensor("weight")
        with open("/proc/self/maps") as maps:
            mapped = {"".join(line.split(maxsplit=5)[5:]).strip() for line in maps}
        files = repack_cache._imported_files()
    assert str(shard.resolve()) in mapped
    assert str(shard.resolve()) not in files
    libtorch = {path for path in mapped if path.endswith("/libtorch_cpu.so")}
    assert libtorch and libtorch <= set(files)
    assert os.path.realpath(torch.__file__) in files


def _read_ahead_notes(cache: Path) -> list[tuple[str, int, int]]:
    """The one rank's read-ahead notes under ``cache``: (path, first byte, bytes) lines."""
    (notes,) = cache.glob("*/read-ahead/*/tp0-pp0")
    lines = [line.split(" ", 2) for line in notes.read_text().splitlines()]
    return [(path, int(offset), int(length)) for offset, length, path in lines]


def _bytes_of(notes: list[tuple[str, int, int]], path: Path) -> int:
    return sum(length for noted, _, length in notes if noted == str(path.resolve()))


def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header: (where its data starts, the parsed JSON)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return 8 + length, json.loads(file.read(length))


def _keeping_time(path: Path, rewrite) -> None:
    """``rewrite(path)``, then the file's modification time as before."""
    before = path.stat()
    rewrite(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_checkpoint_identity_changes_with_any_write_copy_or_json_edit(cache_dir, tmp_path):
    """The key of a warm start needs no tensor bytes, yet any change of the files shows: bytes
    rewritten in place with the modification time set back (the change time moves), a renamed
    tensor, a new time, size or config.json, a copy elsewhere (path, inode)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(W4A16, checkpoint)
    (weights,) = checkpoint.glob("*.safetensors")
    identity = repack_cache.checkpoint_identity(checkpoint)
    assert identity is not None and identity == repack_cache.checkpoint_identity(checkpoint)

    def flip_last_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(data)

    def rename_a_tensor(path: Path) -> None:  # same length, so same size and offsets
        data = path.read_bytes()
        path.write_bytes(data.replace(b"up_proj.weight_scale", b"up_proj.weight_scalf", 1))

    changes = {
        "bytes, time set back": lambda: _keeping_time(weights, flip_last_byte),
        "header": lambda: _keeping_time(weights, rename_a_tensor),
        "time": lambda: os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1)),
        "size": lambda: _keeping_time(weights, lambda p: p.write_bytes(p.read_bytes() + b"\0")),
        "config": lambda: _keeping_time(
            checkpoint / "config.json",
            lambda p: p.write_text(p.read_text().replace('"rms_norm_eps"', ' "rms_norm_eps"')),
        ),
    }
    seen = {identity}
    for change, apply in changes.items():
        apply()
        changed = repack_cache.checkpoint_identity(checkpoint)
        assert changed not in seen, change
        seen.add(changed)
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)  # times kept
    assert repack_cache.checkpoint_identity(copy) not in seen


def test_checkpoint_identity_is_none_where_keyed_by_content(cache_dir, tmp_path, monkeypatch):
    """A hub name (not a local directory), a directory without safetensors files (weights
    streamed from elsewhere), VERIFY=1 and a disabled cache key by content."""
    assert repack_cache.checkpoint_identity("baidu/ERNIE-4.5-21B-A3B-PT") is None
    assert repack_cache.checkpoint_identity(None) is None
    shutil.copy(W4A16 / "config.json", tmp_path)
    assert repack_cache.checkpoint_identity(tmp_path) is None
    monkeypatch.setenv(envs.REPACK_CACHE_VERIFY_VARIABLE, "1")
    assert repack_cache.checkpoint_identity(W4A16) is None
    monkeypatch.setenv(envs.REPACK_CACHE_VERIFY_VARIABLE, "0")
    assert repack_cache.checkpoint_identity(W4A16) is not None
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, "off")
    assert repack_cache.checkpoint_identity(W4A16) is None


def _rotate_routed_experts(path: Path) -> None:
    """Give each routed expert's int4 weight the next expert's bytes (the last the first's), in
    place: the file keeps its size and header, and the model answers otherwise."""
    start, header = _header(path)
    groups: dict[str, list[tuple[int, int, int]]] = {}
    for name, info in header.items():
        parts = name.split(".")
        if ".mlp.experts." in name and name.endswith("proj.weight"):
            expert = int(parts[parts.index("experts") + 1])
            key = name.replace(f".experts.{expert}.", ".experts.*.")
            begin, end = info["data_offsets"]
            groups.setdefault(key, []).append((expert, start + begin, start + end))
    data = bytearray(path.read_bytes())
    for ranges in groups.values():
        ranges.sort()
        blocks = [bytes(data[begin:end]) for _, begin, end in ranges]
        for (_, begin, end), block in zip(ranges, blocks[1:] + blocks[:1], strict=True):
            data[begin:end] = block
    path.write_bytes(data)


def _tensor_names(path: str) -> set[str]:
    with safe_open(path, "pt") as tensors:
        return set(tensors.keys())


@pytest.mark.skipif(
    not vllm_kernel_serves("w4a16"),
    reason="without VNNI the portable experts repack at every start from what they load",
)
def test_a_warm_start_is_served_without_the_experts_and_a_rewrite_repacks(
    tmp_path, monkeypatch, capfd
):
    """Reading the weights once. A cold start on a copy of the W4A16 fixture stores its repacks;
    a warm start is served them without loading the routed experts (its log says so) and answers
    exactly as the cold one. Then every routed expert's weight bytes are rotated to the next
    expert's, keeping size and header: the next start repacks, and answers as the fake-quant
    reference of the rotated weights, not as before."""
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, str(tmp_path / "repack"))
    # Each start in processes of its own, as a restart is (and their logs reach capfd). There,
    # whether the prompts share the first step is timing; with the linears' int8 copy (from 32
    # rows per call) the answers would follow it: the copy is tested in-process below.
    monkeypatch.delenv(ONE_PROCESS, raising=False)
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_INT8_PREFILL", "0")
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(W4A16, checkpoint)
    (weights,) = checkpoint.glob("*.safetensors")
    served = "layers served from"
    cold = vllm_greedy(checkpoint, "bfloat16", 1, MAX_TOKENS, TOP_K)
    assert served not in "".join(capfd.readouterr())
    cold_notes = _read_ahead_notes(tmp_path / "repack")
    asked: list[tuple] = []  # this process builds the config, where the notes are read ahead
    monkeypatch.setattr(repack_cache, "_start_reading_ahead", lambda *args: asked.append(args))
    warm = vllm_greedy(checkpoint, "bfloat16", 1, MAX_TOKENS, TOP_K)
    assert served in "".join(capfd.readouterr())
    assert [[(str(p), o, n) for p, o, n in stretches] for _, stretches in asked] == [cold_notes]
    warm_notes = _read_ahead_notes(tmp_path / "repack")
    # What the next start reads, noted by the cold start already: every entry it stored, and
    # every checkpoint tensor but the routed experts (from the file's header).
    stored = {str(path) for path in (tmp_path / "repack").glob("*/*.safetensors")}
    assert stored and {path for path, _, length in cold_notes if length == 0} == stored
    _, header = _header(weights)
    routed = re.compile(r"\.mlp\.experts\.\d+\.")
    kept = sum(end - begin for name, info in header.items() if name != "__metadata__"
               and not routed.search(name) for begin, end in [info["data_offsets"]])  # fmt: skip
    assert _bytes_of(cold_notes, weights) == kept
    assert warm_notes == cold_notes
    # And the files the engine process imported, this plugin's model among them.
    (imports,) = (tmp_path / "repack").glob("*/read-ahead/*/imports")
    model_source = Path(repack_cache.__file__).resolve().parents[1] / "model.py"
    imported = imports.read_text().split("\n")
    assert str(model_source) in imported
    assert not [path for path in imported if path.endswith(".safetensors")]
    assert [g.token_ids for g in warm] == [g.token_ids for g in cold]
    assert logprob_drift(cold, warm).max() == 0
    _keeping_time(weights, _rotate_routed_experts)
    rewritten = vllm_greedy(checkpoint, "bfloat16", 1, MAX_TOKENS, TOP_K)
    assert served not in "".join(capfd.readouterr())
    plain = dequantized_checkpoint(checkpoint, tmp_path / "dequantized")
    reference = transformers_greedy(
        plain, "float32", MAX_TOKENS, TOP_K, prepare=fake_quantize_activations
    )
    check_logprobs_close(reference, rewritten)
    assert logprob_drift(cold, rewritten).max() > 0.05


@pytest.mark.skipif(
    not vllm_kernel_serves("w4a16"),
    reason="the int8 copy is made for W4A16 linears on vLLM's int4 kernel (VNNI) only",
)
def test_the_int8_copy_has_an_entry_of_its_own_never_read_ahead(tmp_path, monkeypatch):
    """The W4A16 linears' int8 copy: stored by a cold start, in entries holding nothing else,
    left out of what the next start reads ahead (it is read on a first call of 32 rows or more),
    and served to a warm start, which answers exactly as the cold one (the fixture's prompts
    share the first step in-process: over 32 rows, on the copy)."""
    monkeypatch.setenv(envs.REPACK_CACHE_VARIABLE, str(tmp_path / "repack"))
    monkeypatch.setenv("VLLM_ERNIE_MOE_W4A16_INT8_PREFILL", "1")
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(W4A16, checkpoint)
    cold = vllm_greedy(checkpoint, "bfloat16", 1, MAX_TOKENS, TOP_K)
    stored = {str(path) for path in (tmp_path / "repack").glob("*/*.safetensors")}
    copies = {path for path in stored if _tensor_names(path) == {"int8_weight", "int8_scale"}}
    notes = _read_ahead_notes(tmp_path / "repack")
    assert copies and {path for path, _, length in notes if length == 0} == stored - copies
    warm = vllm_greedy(checkpoint, "bfloat16", 1, MAX_TOKENS, TOP_K)
    assert {str(path) for path in (tmp_path / "repack").glob("*/*.safetensors")} == stored
    assert [g.token_ids for g in warm] == [g.token_ids for g in cold]
    assert logprob_drift(cold, warm).max() == 0
