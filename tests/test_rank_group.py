"""The rank harness itself: failures and hangs are reported in bounded time, never hang."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from ulysses_dtensor.tools.rank_group import RankFailure, RankGroup


def _raise_on_rank_one(ctx):
    if ctx.rank == 1:
        raise RuntimeError("boom on rank 1")
    return ctx.rank


def _rank_one_skips_collective(ctx):
    if ctx.rank == 1:
        raise RuntimeError("rank 1 failed before the collective")
    t = torch.ones(4)
    dist.all_reduce(t, group=ctx.group)  # the others block here
    return t


def _sum_ranks(ctx):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=ctx.group)
    return t.item()


def test_results_by_rank_and_subgroups():
    with RankGroup(3) as ranks:
        assert ranks.run(_sum_ranks) == [3.0, 3.0, 3.0]
        assert ranks.run(_sum_ranks, world=2) == [1.0, 1.0]


def test_failure_names_the_rank_and_group_recovers():
    with RankGroup(2, grace_after_error_s=3) as ranks:
        with pytest.raises(RankFailure, match="boom on rank 1"):
            ranks.run(_raise_on_rank_one)
        assert ranks.run(_sum_ranks) == [1.0, 1.0]


def test_rank_failing_before_a_collective_does_not_hang():
    with RankGroup(3, grace_after_error_s=3) as ranks:
        t0 = time.monotonic()
        with pytest.raises(RankFailure) as info:
            ranks.run(_rank_one_skips_collective)
        assert time.monotonic() - t0 < 30
        assert 1 in info.value.errors
        assert ranks.run(_sum_ranks) == [3.0, 3.0, 3.0]  # restarted
