"""A node started with other settings than node 0's is refused at start, on every node, with a
message naming the node, what differs and the fix (``vllm_ernie_moe/rank_agreement.py``), within
the plugin's bound on waits between nodes. The other faults (a node killed with requests in
flight, never started, given a wrong master address, another model or TP) are measured by
``benchmarks/multinode_faults.py`` (docs/multinode.md)."""

import subprocess

import pytest
from two_hosts import SMALL_ENGINE, start_node, two_hosts

from vllm_ernie_moe.tools.served import free_port, stop

#: The plugin's wait between nodes for this test, and how long node 0 may take to end after it.
NODE_TIMEOUT = 120
BOUND = NODE_TIMEOUT + 240


def test_a_node_started_with_another_dtype_and_compilation_is_refused_naming_both(
    checkpoint, tmp_path
):
    """Node 1 also compiles where node 0 runs eager: its CPU warm-up would run a 16-token forward
    and a sampler run of 4 rows (--max-num-seqs 4), whose collectives node 0 never joins
    (patches/patch_cpu_warmup_size.py)."""
    path = checkpoint("tiny-21b")
    compiled = [arg for arg in SMALL_ENGINE if arg != "--enforce-eager"]
    arguments = (["--dtype", "float32", *SMALL_ENGINE], ["--dtype", "bfloat16", *compiled])
    with two_hosts() as hosts:
        ports = (free_port(), free_port())
        nodes = [
            start_node(rank, hosts, path, ports, tmp_path / f"node{rank}.log", args, tp=4,
                       VLLM_ERNIE_MOE_NODE_TIMEOUT=str(NODE_TIMEOUT))
            for rank, args in enumerate(arguments)
        ]  # fmt: skip
        try:
            code = nodes[0].wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {BOUND} s after start; see {tmp_path}")
        finally:
            for process in nodes:
                stop(process)
    assert code != 0
    said = (tmp_path / "node0.log").read_text()
    assert "the nodes of this engine did not load the same model" in said
    assert f"node 1 ({hosts[1].address}), from rank 2: dtype 'torch.bfloat16' where rank 0 has " \
        "'torch.float32', CPU warm-up '16 tokens, 4 sampled' where rank 0 has 'none'" \
        in said  # fmt: skip
    assert "Start every node with the same model files" in said
