"""Split arithmetic (no processes): matches DTensor's Shard rule; GQA receives only what it reads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ulysses_dtensor.layout import UlyssesLayout, head_ranges, kv_head_ranges, seq_shard_sizes


@given(world=st.integers(1, 8), extra=st.integers(0, 50))
def test_seq_shards_follow_torch_chunk(world, extra):
    n = world + extra
    chunks = [c.numel() for c in torch.arange(n).chunk(world)]
    assert seq_shard_sizes(n, world) == chunks + [0] * (world - len(chunks))


def test_sequence_shorter_than_world_is_refused():
    with pytest.raises(ValueError, match="shorter than the sequence-parallel degree 4"):
        seq_shard_sizes(3, 4)


@given(world=st.integers(1, 8), heads=st.integers(1, 40))
def test_head_ranges_partition_and_balance(world, heads):
    ranges = head_ranges(heads, world)
    assert ranges[0][0] == 0 and ranges[-1][1] == heads
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    widths = [b - a for a, b in ranges]
    assert max(widths) - min(widths) <= 1


@given(world=st.integers(1, 8), kv=st.integers(1, 8), group=st.integers(1, 5))
def test_kv_ranges_are_exactly_the_heads_read(world, kv, group):
    heads = kv * group
    q_ranges = head_ranges(heads, world)
    for (qs, qe), (ks, ke) in zip(q_ranges, kv_head_ranges(q_ranges, heads, kv)):
        assert set(range(ks, ke)) == {h // group for h in range(qs, qe)}


@given(
    world=st.integers(1, 8), kv_exp=st.integers(0, 3), group=st.sampled_from([1, 2, 4]),
    B=st.integers(1, 3), tokens_per_rank=st.integers(1, 8), D=st.integers(1, 16),
)
def test_closed_form_minimum_when_everything_divides(world, kv_exp, group, B, tokens_per_rank, D):
    """(P-1)/P^2 * B*N*D*(2H + 2*max(H_kv, P)) elements per rank, when P divides N and H, and
    H_kv divides P or P divides H_kv (each rank then reads whole kv heads, none twice)."""
    kv = 2**kv_exp
    heads = kv * group
    if heads % world or not (world % kv == 0 or kv % world == 0):
        return
    N = world * tokens_per_rank
    layout = UlyssesLayout.build(B, heads, kv, N, D, world)
    minimum = (world - 1) * B * N * D * (2 * heads + 2 * max(kv, world)) // world**2
    for rank in range(world):
        assert layout.forward_elements_sent(rank) == minimum
        assert layout.backward_elements_sent(rank) == minimum
