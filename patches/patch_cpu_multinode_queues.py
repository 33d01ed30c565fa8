"""Patch: on CPU, vLLM's multi-node executor dies at start when a node runs more than one rank.

- Target: ``WorkerProc._init_message_queues`` in ``vllm.v1.executor.multiproc_executor``
  (vLLM 0.27 to 0.33); the rule it reaches is
  ``MessageQueue.create_from_process_group_single_reader`` in
  ``vllm.distributed.device_communicators.shm_broadcast``.
- Why: with ``--nnodes`` > 1 every rank opens a response queue read by rank 0, through shared
  memory when the reader is on its node. That function decides "same node" as
  ``rank // local_size == reader_rank // local_size`` with ``local_size`` the platform's device
  count, and ``torch.cpu.device_count()`` is 1: rank 1 of a two-rank node counts as on another
  node and opens a remote-only queue, while the executor (which puts ranks
  ``[node_rank * local_world_size, ...)`` on a node) expects a local one and stops at
  ``assert local_message_queue is not None``. TP=2 as 1 + 1 works; 2 + 2, 4 + 4 and 8 + 8 die.
- How: while a worker builds its queues on a multi-node engine whose platform published no
  per-node device list (CPU), the list vLLM consults first
  (``vllm.platforms.interface.get_assigned_physical_gpu_ids``) answers the node's
  ``local_world_size`` ranks, so "same node" is the executor's ``rank // local_world_size``.
  Nothing else reads it there, and it is restored after the call.
- Decided by behaviour: a probe runs the queue function as rank 1 of a two-rank node with rank 0
  as the reader (process group and queue stubbed); the patch applies exactly when the reader is
  not counted as local. On GPUs (device count = GPUs per node) the probe sees no bug.
- Upstream: present in vLLM 0.27.1, 0.32.0 and 0.33.0; no upstream issue found. The fix:
  ``docs/upstream/cpu-multinode-queues.md``.
- Remove when: the probe reports no bug on every supported vLLM (the plugin logs "not needed").
- Test: ``tests/test_patch_cpu_multinode_queues.py``; end to end ``tests/test_multinode.py``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from vllm_ernie_moe.patches.patching import install

EXECUTOR_MODULE = "vllm.v1.executor.multiproc_executor"
QUEUE_MODULE = "vllm.distributed.device_communicators.shm_broadcast"
PLATFORM_MODULE = "vllm.platforms.interface"


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextmanager
def node_ranks(count: int) -> Iterator[None]:
    """vLLM's per-node device list answers ``count`` entries for the duration."""
    ids = list(range(count))
    with _replaced(importlib.import_module(PLATFORM_MODULE), "get_assigned_physical_gpu_ids",
                   lambda: ids):  # fmt: skip
        yield


def reader_counts_as_local() -> bool:
    """Rank 1 of a two-rank node opens a queue read by rank 0: is the reader on its node?"""
    queues = importlib.import_module(QUEUE_MODULE)
    seen = {}

    class QueueStub:
        def __init__(self, n_reader: int, n_local_reader: int, **_: object) -> None:
            seen["local_readers"] = n_local_reader

        def export_handle(self) -> None:
            return None

    rank_1_of_2 = SimpleNamespace(
        get_rank=lambda: 1, get_world_size=lambda group: 2, gather_object=lambda *a, **k: None
    )
    create_single_reader = queues.MessageQueue.create_from_process_group_single_reader
    with _replaced(queues, "MessageQueue", QueueStub), _replaced(queues, "dist", rank_1_of_2):
        create_single_reader(None, 1, 1, reader_rank=0)
    return seen["local_readers"] == 1


def node_local_queues(init_message_queues):
    """``_init_message_queues`` that counts a node's ranks as the executor does."""

    @functools.wraps(init_message_queues)
    def wrapped(self, input_shm_handle, vllm_config) -> None:
        parallel = vllm_config.parallel_config
        published = importlib.import_module(PLATFORM_MODULE).get_assigned_physical_gpu_ids()
        if parallel.nnodes_within_dp == 1 or published is not None:
            return init_message_queues(self, input_shm_handle, vllm_config)
        with node_ranks(parallel.local_world_size):
            return init_message_queues(self, input_shm_handle, vllm_config)

    return wrapped


def _two_rank_node_splits(init_message_queues) -> bool:
    return not reader_counts_as_local()


def apply() -> bool:
    """Patch the worker's queue set-up if the probe sees the bug; idempotent. True when active."""
    worker = importlib.import_module(EXECUTOR_MODULE).WorkerProc
    return install(
        __name__, worker, "_init_message_queues", node_local_queues,
        bug_present=_two_rank_node_splits,
        fixed="a node's ranks share its response queues, as the executor expects",
    )  # fmt: skip
