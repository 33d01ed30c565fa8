"""Every rank of an engine spread over several nodes must load the same model the same way.

Each node of a multi-node engine is started on its own (``vllm serve ... --headless`` on the
others) and reads its own copy of the weights with its own arguments. vLLM checks neither: a node
started with another fine-tune of the same geometry, another ``--dtype`` or another quantization
serves mixed, silently wrong answers, or dies later in a collective of mismatched sizes. So after
loading, the ranks exchange what they loaded (a digest of the checkpoint as streamed, the dtype,
the quantization, speculative decoding, on CPU what the warm-up runs through collectives, the vLLM
and plugin versions) and all refuse to start when they differ, naming the node that differs and
the fix.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable, Iterator
from importlib.metadata import version

import torch

from vllm_ernie_moe import compat
from vllm_ernie_moe.layout import is_routed_expert

#: Bytes of each tensor the digest reads: enough to tell fine-tunes of one geometry apart, cheap on
#: memory-mapped weights (each rank reads only its shard of the rest).
SAMPLED_BYTES = 4096


class CheckpointDigest:
    """An order-independent digest of the tensors a rank streams but the routed experts: names,
    shapes, dtypes and the first ``SAMPLED_BYTES`` of each. The routed experts are most of the
    bytes, and a warm start does not read them (``quant/repack_cache.py``), nor has them streamed:
    a rank with the cache and one without must agree. So two ranks whose checkpoints differ in the
    routed experts only are not told apart. Touching one page of a memory-mapped tensor
    reads the disk's read-ahead around it (8 MiB here): mapping every tensor of the 28-layer
    21B-A3B read 11.34 of its 12.30 GiB (docs/results/lazy-checkpoint-read-zen4.json)."""

    def __init__(self) -> None:
        self._per_tensor: list[bytes] = []

    def observe(
        self, tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if not is_routed_expert(name):
                self._per_tensor.append(_tensor_digest(name, tensor))
            yield name, tensor

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(sorted(self._per_tensor))).hexdigest()[:16]


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """Name, shape, dtype and the first ``SAMPLED_BYTES``: enough to tell fine-tunes apart."""
    flat = tensor.detach().reshape(-1)
    sample = flat[: max(1, SAMPLED_BYTES // flat.element_size())].cpu().contiguous()
    entry = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    entry.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return entry.digest()


def place_of_this_rank(parallel_config) -> str:
    """How the messages name where a rank runs: its node, address, data-parallel rank."""
    where = f"node {parallel_config.node_rank} "
    where += f"({os.environ.get('VLLM_HOST_IP') or socket.gethostname()})"
    if parallel_config.data_parallel_size > 1:
        where += f", data-parallel rank {parallel_config.data_parallel_rank}"
    return where


def speculative_method(vllm_config) -> str:
    """How a rank drafts tokens, as a node's ``--speculative-config`` sets it: "off", or the
    method and the tokens drafted per step."""
    speculative = vllm_config.speculative_config
    if speculative is None:
        return "off"
    return f"{speculative.method}, {speculative.num_speculative_tokens} tokens"


def require_same_model_on_every_rank(where: str, loaded: dict[str, str]) -> None:
    """All-gather (``where``, ``loaded``: setting -> value) over the engine's ranks and raise on
    every rank when one differs from rank 0's. Nothing to compare on a single rank."""
    import torch.distributed as dist
    from vllm.distributed import get_world_group

    world = get_world_group()
    if world.world_size == 1:
        return
    loaded = dict(loaded, vllm=str(compat.vllm_version()), plugin=version("vllm-ernie-moe"))
    everyone: list = [None] * world.world_size
    dist.all_gather_object(everyone, (where, loaded), group=world.cpu_group)
    problem = disagreement(everyone)
    if problem:
        raise RuntimeError(problem)


def disagreement(everyone: list[tuple[str, dict[str, str]]]) -> str | None:
    """Per rank (where, loaded): None when every rank loaded what rank 0 did, else the message
    naming, for each other place, what differs and the fix."""
    first_where, first = everyone[0]
    differing: dict[str, str] = {}
    for rank, (where, loaded) in enumerate(everyone):
        changed = [
            f"{key} {loaded.get(key)!r} where rank 0 has {value!r}"
            for key, value in first.items()
            if loaded.get(key) != value
        ]
        if changed and where not in differing:
            differing[where] = f"  {where}, from rank {rank}: " + ", ".join(changed)
    if not differing:
        return None
    return (
        "vllm-ernie-moe: the nodes of this engine did not load the same model (rank 0 is on "
        f"{first_where}):\n" + "\n".join(differing.values()) + "\nStart every node with the "
        "same model files, the same vLLM and vllm-ernie-moe versions, the same `vllm serve` "
        "arguments (examples/multinode.sh passes its arguments to each node unchanged) and the "
        "same VLLM_* environment variables."
    )
