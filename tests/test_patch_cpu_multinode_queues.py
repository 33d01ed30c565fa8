"""patch_cpu_multinode_queues: on a multi-node CPU engine, a node's ranks share its response
queues (vLLM's "same node" rule counts one rank per node on CPU). End to end:
``tests/test_multinode.py`` (two nodes of two ranks)."""

import importlib
from types import SimpleNamespace

from vllm_ernie_moe.patches import patch_cpu_multinode_queues as patch

interface = importlib.import_module(patch.PLATFORM_MODULE)


def test_vllm_counts_a_node_mate_as_remote_on_cpu():
    """The bug the patch exists for: vLLM's rule, rank 1 and reader rank 0 of a two-rank node.
    Hand-computed: rank // device_count with torch.cpu.device_count() == 1 puts them apart."""
    import torch

    assert torch.cpu.device_count() == 1
    assert patch.reader_counts_as_local() is False


def test_with_the_node_size_published_the_reader_is_local():
    with patch.node_ranks(2):
        assert patch.reader_counts_as_local() is True
    assert interface.get_assigned_physical_gpu_ids() is None  # restored


def config(nnodes: int, local_world_size: int) -> SimpleNamespace:
    parallel = SimpleNamespace(nnodes_within_dp=nnodes, local_world_size=local_world_size)
    return SimpleNamespace(parallel_config=parallel)


def test_the_worker_sees_its_node_size_only_on_multi_node_engines():
    seen = []

    def init_message_queues(self, input_shm_handle, vllm_config) -> None:
        seen.append(interface.get_assigned_physical_gpu_ids())

    wrapped = patch.node_local_queues(init_message_queues)
    wrapped(None, None, config(nnodes=2, local_world_size=4))
    wrapped(None, None, config(nnodes=1, local_world_size=4))
    assert seen == [[0, 1, 2, 3], None]
    assert interface.get_assigned_physical_gpu_ids() is None


def test_applied_once_and_marked():
    worker = importlib.import_module(patch.EXECUTOR_MODULE).WorkerProc
    assert patch.apply() is True
    assert patch.apply() is True
    assert worker._init_message_queues._vllm_ernie_moe_patch is True
