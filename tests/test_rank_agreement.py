"""``vllm_ernie_moe/rank_agreement.py``: the digest of the weights a rank streams, and the message
when the ranks of a multi-node engine loaded different things. The end-to-end refusal (node 1
started with another dtype, compiled where node 0 is eager) is in
``tests/test_multinode_faults.py``."""

from types import SimpleNamespace

import torch

from vllm_ernie_moe.rank_agreement import (
    SAMPLED_BYTES,
    CheckpointDigest,
    disagreement,
    speculative_method,
)


def digest_of(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = CheckpointDigest()
    assert list(digest.observe(tensors)) == tensors  # passes every tensor through unchanged
    return digest.hexdigest()


def test_digest_is_independent_of_order_and_sees_values_names_shapes_and_dtypes():
    a, b = torch.randn(8, 4), torch.randn(16)
    base = digest_of([("a", a), ("b", b)])
    assert digest_of([("b", b), ("a", a)]) == base
    changed = a.clone()
    changed[0, 0] += 1
    assert digest_of([("a", changed), ("b", b)]) != base
    assert digest_of([("a2", a), ("b", b)]) != base
    assert digest_of([("a", a.reshape(4, 8)), ("b", b)]) != base
    assert digest_of([("a", a.to(torch.bfloat16)), ("b", b)]) != base


def test_digest_reads_only_the_head_of_each_tensor():
    big = torch.zeros(SAMPLED_BYTES)  # fp32: four times the sampled bytes
    tail_changed = big.clone()
    tail_changed[-1] = 1
    assert digest_of([("w", big)]) == digest_of([("w", tail_changed)])


def test_digest_reads_no_routed_expert_bytes():
    """A warm start does not read the routed experts, nor has them streamed (the repack cache
    serves them): a rank with the cache must agree with one without."""
    expert = "model.layers.1.mlp.experts.0.up_proj.weight"
    w = torch.zeros(4, 4)
    assert digest_of([(expert, w)]) == digest_of([(expert, w + 1)]) == digest_of([])
    shared = "model.layers.1.mlp.shared_experts.up_proj.weight"
    assert digest_of([(shared, w)]) != digest_of([(shared, w + 1)])


def loaded(dtype: str = "torch.float32", checkpoint: str = "abc") -> dict[str, str]:
    return {"dtype": dtype, "quantization": "None", "checkpoint": checkpoint}


def test_agreeing_ranks_pass():
    ranks = [("node 0 (10.0.0.1)", loaded())] * 2 + [("node 1 (10.0.0.2)", loaded())] * 2
    assert disagreement(ranks) is None


def test_a_node_that_differs_is_named_with_what_differs_and_the_fix():
    ranks = [("node 0 (10.0.0.1)", loaded())] * 2 + [
        ("node 1 (10.0.0.2)", loaded("torch.bfloat16", "def"))
    ] * 2
    message = disagreement(ranks)
    assert "rank 0 is on node 0 (10.0.0.1)" in message
    assert "node 1 (10.0.0.2), from rank 2" in message
    assert "dtype 'torch.bfloat16' where rank 0 has 'torch.float32'" in message
    assert "checkpoint 'def' where rank 0 has 'abc'" in message
    assert message.count("node 1 (10.0.0.2), from") == 1  # once per node, not per rank
    assert "same model files" in message and "same `vllm serve`" in message


def test_a_node_drafting_otherwise_differs():
    """A drafter's runs have collectives of their own: a node started without (or with another)
    ``--speculative-config`` must not pass."""
    off = SimpleNamespace(speculative_config=None)
    mtp = SimpleNamespace(
        speculative_config=SimpleNamespace(method="mtp", num_speculative_tokens=1)
    )  # fmt: skip
    assert speculative_method(off) == "off"
    assert speculative_method(mtp) == "mtp, 1 tokens"
    everyone = [("node 0 (a)", {"speculative decoding": speculative_method(mtp)}),
                ("node 1 (b)", {"speculative decoding": speculative_method(off)})]  # fmt: skip
    assert "node 1 (b), from rank 1: speculative decoding 'off' where rank 0 has 'mtp, 1 tokens'" \
        in disagreement(everyone)  # fmt: skip
