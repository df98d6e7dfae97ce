"""Resharding between the sequence-sharded and head-sharded layouts with one all-to-all.

``(B, H, N/P, D)`` on every rank  <->  ``(B, H/P, N, D)`` on every rank.

Each exchange moves any number of tensors in a single ``all_to_all_single`` (q, k and v
together), with uneven split sizes for ``N % P != 0`` and ``H % P != 0`` and no padding. The
collective is the functional ``_c10d_functional.all_to_all_single`` op: the same real
all-to-all on gloo, NCCL and any other backend (never DTensor's CPU all-gather fallback), and
traceable by torch.compile. Both directions are autograd functions whose backward is the
inverse exchange, so backward issues exactly one collective per forward collective.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.distributed as dist

# ExchangePlan lives with the layout that builds it; importable from here, where it runs
from .layout import ExchangePlan, HeadRange, UlyssesLayout, head_ranges, seq_shard_offsets, seq_shard_sizes

Tensor = torch.Tensor


def _start_all_to_all(send: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Issue the all-to-all and return its (not yet waited) result: compute issued before
    :func:`_wait` overlaps with the transfer (NCCL: on its own stream)."""
    if len(input_splits) == 1:  # a group of one: the buffer is already the result
        return send
    return torch.ops._c10d_functional.all_to_all_single(send, output_splits, input_splits, group.group_name)


def _wait(result: Tensor) -> Tensor:
    return torch.ops._c10d_functional.wait_tensor(result)


def _seq_to_head(plan: ExchangePlan, tensors: Sequence[Tensor]) -> list[Tensor]:
    """(B, H_i, n_rank, D_i) -> (B, |heads_i[rank]|, N, D_i), one collective for all tensors."""
    return _seq_to_head_finish(_seq_to_head_start(plan, tensors))


# An issued exchange: (plan, its not yet waited receive buffer, batch, per-tensor last dims). A
# plain tuple, which torch.compile traces like the tensors in it.
_Pending = tuple


def _seq_to_head_start(plan: ExchangePlan, tensors: Sequence[Tensor]) -> _Pending:
    """Pack and issue :func:`_seq_to_head`'s all-to-all; compute before the finish overlaps it."""
    rank, world = plan.rank, plan.world
    n_own = plan.seq_sizes[rank]
    batch = tensors[0].shape[0]
    dims = [t.shape[-1] for t in tensors]

    # Send buffer: for each destination, every tensor's slice of the heads it owns.
    send_pieces, input_splits = [], []
    for dst in range(world):
        size = 0
        for t, ranges in zip(tensors, plan.heads):
            start, stop = ranges[dst]
            send_pieces.append(t[:, start:stop])
            size += batch * (stop - start) * n_own * t.shape[-1]
        input_splits.append(size)
    send = _pack(send_pieces, tensors[0])

    output_splits = []
    for src in range(world):
        width_dims = sum((r[rank][1] - r[rank][0]) * d for r, d in zip(plan.heads, dims))
        output_splits.append(batch * plan.seq_sizes[src] * width_dims)
    # the packed copy is freed once the collective has it (lower peak than keeping it to the unpack)
    return plan, _start_all_to_all(send, output_splits, input_splits, plan.group), batch, dims


def _seq_to_head_finish(pending: _Pending) -> list[Tensor]:
    plan, recv, batch, dims = pending
    recv = _wait(recv)
    rank = plan.rank
    # Receive buffer: for each source, every tensor's slice of its tokens; concat over sources.
    pieces: list[list[Tensor]] = [[] for _ in dims]
    offset = 0
    for src in range(plan.world):
        n_src = plan.seq_sizes[src]
        for i, (ranges, d) in enumerate(zip(plan.heads, dims)):
            width = ranges[rank][1] - ranges[rank][0]
            size = batch * width * n_src * d
            pieces[i].append(recv[offset : offset + size].view(batch, width, n_src, d))
            offset += size
    return [torch.cat(p, dim=2) for p in pieces]


def _head_to_seq(plan: ExchangePlan, tensors: Sequence[Tensor]) -> list[Tensor]:
    """(B, |heads_i[rank]|, N, D_i) -> (B, H_i, n_rank, D_i), one collective for all tensors.

    Where several ranks own the same head (GQA kv heads), their contributions are summed: this
    is the exact adjoint of ``_seq_to_head``, which is what its backward needs.
    """
    return _head_to_seq_finish(_head_to_seq_start(plan, tensors))


def _head_to_seq_start(plan: ExchangePlan, tensors: Sequence[Tensor]) -> _Pending:
    """Pack and issue :func:`_head_to_seq`'s all-to-all."""
    rank, world = plan.rank, plan.world
    n_own = plan.seq_sizes[rank]
    offsets = seq_shard_offsets(list(plan.seq_sizes))
    batch = tensors[0].shape[0]
    dims = [t.shape[-1] for t in tensors]

    send_pieces, input_splits = [], []
    for dst in range(world):
        lo, n_dst = offsets[dst], plan.seq_sizes[dst]
        size = 0
        for t in tensors:
            send_pieces.append(t[:, :, lo : lo + n_dst])
            size += batch * t.shape[1] * n_dst * t.shape[-1]
        input_splits.append(size)
    send = _pack(send_pieces, tensors[0])

    output_splits = []
    for src in range(world):
        width_dims = sum((r[src][1] - r[src][0]) * d for r, d in zip(plan.heads, dims))
        output_splits.append(batch * n_own * width_dims)
    return plan, _start_all_to_all(send, output_splits, input_splits, plan.group), batch, dims


def _head_to_seq_finish(pending: _Pending) -> list[Tensor]:
    plan, recv, batch, dims = pending
    recv = _wait(recv)
    n_own = plan.seq_sizes[plan.rank]
    results = []
    chunks: list[list[tuple[HeadRange, Tensor]]] = [[] for _ in dims]
    offset = 0
    for src in range(plan.world):
        for i, (ranges, d) in enumerate(zip(plan.heads, dims)):
            start, stop = ranges[src]
            size = batch * (stop - start) * n_own * d
            chunks[i].append(((start, stop), recv[offset : offset + size].view(batch, stop - start, n_own, d)))
            offset += size
    for i, (num_heads, d) in enumerate(zip(plan.num_heads, dims)):
        if _is_ordered_partition([r for r, _ in chunks[i]], num_heads):
            results.append(torch.cat([c for _, c in chunks[i]], dim=1))
        else:
            out = recv.new_zeros(batch, num_heads, n_own, d)
            for (start, stop), c in chunks[i]:
                out[:, start:stop] += c
            results.append(out)
    return results


def _pack(pieces: list[Tensor], like: Tensor) -> Tensor:
    """Copy strided pieces into one flat send buffer: one copy, no intermediate flattening."""
    buf = like.new_empty(sum(p.numel() for p in pieces))
    offset = 0
    for p in pieces:
        buf[offset : offset + p.numel()].view(p.shape).copy_(p)
        offset += p.numel()
    return buf


def _is_ordered_partition(ranges: list[HeadRange], num_heads: int) -> bool:
    expected = 0
    for start, stop in ranges:
        if start != stop and start != expected:
            return False
        expected = max(expected, stop)
    return expected == num_heads


def _profiled(name: str):
    """A profiler range around a whole exchange (pack, all-to-all, wait, unpack) in eager mode,
    so benchmarks can attribute the sequence-parallel overhead; nothing under compile."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: ExchangePlan, *tensors: Tensor):
        ctx.plan = plan
        with _profiled("ulysses_dtensor::seq_to_head"):
            return tuple(_seq_to_head(plan, tensors))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, *_HeadToSeq.apply(ctx.plan, *grads))


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: ExchangePlan, *tensors: Tensor):
        ctx.plan = plan
        with _profiled("ulysses_dtensor::head_to_seq"):
            return tuple(_head_to_seq(plan, tensors))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, *_SeqToHead.apply(ctx.plan, *grads))


def exchange_seq_to_head(plan: ExchangePlan, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Autograd-aware fused sequence->head exchange of ``tensors`` following ``plan``."""
    return _SeqToHead.apply(plan, *tensors)


def exchange_head_to_seq(plan: ExchangePlan, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Autograd-aware fused head->sequence exchange of ``tensors`` following ``plan``."""
    return _HeadToSeq.apply(plan, *tensors)


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, int, int]:
    """Resolve ``group`` (None = default group) and check this process belongs to it."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given process group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given process group"
        )
    return group, rank, dist.get_world_size(group)


def check_4d(x: Tensor, name: str) -> None:
    """A 4-D (B, H, N, D) tensor, or a TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(x.shape)}")


def resolve_seq_len(n_local: int, seq_len: int | None, rank: int, world: int) -> int:
    """Global sequence length, checked against this rank's shard size."""
    if seq_len is None:
        seq_len = n_local * world
    sizes = seq_shard_sizes(seq_len, world)
    if sizes[rank] != n_local:
        raise ValueError(
            f"rank {rank} holds {n_local} tokens but a global sequence of {seq_len} over {world} "
            f"ranks gives it {sizes[rank]} (DTensor Shard layout: ranks hold ceil(N/P) tokens, the "
            f"last ones fewer); pass seq_len=<global length> for uneven shards"
        )
    return seq_len


def seq_to_head(x: Tensor, group: dist.ProcessGroup | None = None, *, seq_len: int | None = None) -> Tensor:
    """Sequence-sharded to head-sharded, one all-to-all.

    Args:
        x: (B, H, N_r, D), this rank's tokens (DTensor ``Shard(2)`` layout) for all heads.
        group: the sequence-parallel process group (default: world).
        seq_len: global N; default ``N_r * P`` (even split).

    Returns:
        (B, H_r, N, D): every token for this rank's heads. ``H_r`` follows ``head_ranges(H, P)``:
        ``H % P != 0`` gives the first ranks one extra head.
    """
    check_4d(x, "x")
    group, rank, world = group_rank_world(group)
    seq_len = resolve_seq_len(x.shape[2], seq_len, rank, world)
    return exchange_seq_to_head(_single_tensor_plan(x, x.shape[1], seq_len, rank, world, group), x)[0]


def head_to_seq(x: Tensor, group: dist.ProcessGroup | None = None, *, num_heads: int | None = None) -> Tensor:
    """Head-sharded to sequence-sharded, one all-to-all; the inverse of :func:`seq_to_head`.

    Args:
        x: (B, H_r, N, D), every token for this rank's heads.
        group: the sequence-parallel process group (default: world).
        num_heads: global H; default ``H_r * P`` (even split).

    Returns:
        (B, H, N_r, D): this rank's tokens (DTensor ``Shard(2)`` layout) for all heads.
    """
    check_4d(x, "x")
    group, rank, world = group_rank_world(group)
    if num_heads is None:
        num_heads = x.shape[1] * world
    start, stop = head_ranges(num_heads, world)[rank]
    if stop - start != x.shape[1]:
        raise ValueError(
            f"rank {rank} holds {x.shape[1]} heads but {num_heads} heads over {world} ranks give it "
            f"{stop - start}; pass num_heads=<global head count>"
        )
    return exchange_head_to_seq(_single_tensor_plan(x, num_heads, x.shape[2], rank, world, group), x)[0]


def _single_tensor_plan(
    x: Tensor, num_heads: int, seq_len: int, rank: int, world: int, group: dist.ProcessGroup
) -> ExchangePlan:
    """The exchange of ``x`` (B, *, *, D) alone: its ``num_heads`` heads split like query heads
    (no GQA), ``seq_len`` tokens split like DTensor ``Shard``."""
    layout = UlyssesLayout.build(x.shape[0], num_heads, num_heads, seq_len, x.shape[3], world)
    return layout.out_plan(rank, group)
