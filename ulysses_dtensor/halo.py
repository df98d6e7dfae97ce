"""The tokens just before this rank's sequence shard (a causal convolution's halo), one all-to-all.

A causal convolution of kernel size K reads, for each token, the K - 1 tokens before it. On
sequence shards only the first K - 1 tokens of a rank need tokens it does not hold: those are
the last K - 1 tokens of the global sequence before its shard, held by the previous rank (or
ranks, when shards are shorter than K - 1). :func:`previous_tokens` fetches exactly those with
one ``all_to_all_single`` (empty splits for everyone else), B·C·(K-1) elements per rank; its
backward sends their gradients back to the owners, who add them to their own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import _start_all_to_all, _wait
from .layout import HeadRange, seq_shard_offsets

Tensor = torch.Tensor


def halo_spans(seq_sizes: list[int], halo: int, src: int, dst: int) -> HeadRange:
    """The local token span [a, b) of ``src``'s shard that ``dst`` reads as its halo (the
    ``halo`` global tokens before ``dst``'s first one); empty when ``src`` holds none of them."""
    offsets = seq_shard_offsets(seq_sizes)
    lo, hi = max(0, offsets[dst] - halo), offsets[dst]
    a, b = max(lo, offsets[src]), min(hi, offsets[src] + seq_sizes[src])
    if b <= a:
        return (0, 0)
    return (a - offsets[src], b - offsets[src])


def halo_elements_sent(seq_sizes: list[int], halo: int, rank: int, per_token: int) -> tuple[int, int]:
    """Elements ``rank`` sends in :func:`previous_tokens`, forward and backward: ``per_token``
    (B·C) per token of its shard that later ranks read, then per token of its own halo (the
    gradient going back to the owners)."""
    world = len(seq_sizes)
    out = sum(b - a for a, b in (halo_spans(seq_sizes, halo, rank, d) for d in range(world) if d != rank))
    back = sum(b - a for a, b in (halo_spans(seq_sizes, halo, s, rank) for s in range(world) if s != rank))
    return per_token * out, per_token * back


def _exchange(send_pieces: list[Tensor], output_sizes: list[int], like: Tensor, group) -> list[Tensor]:
    """All-to-all of one (B, C, t) piece per destination; returns one (B, C, t_src) per source."""
    batch, channels = like.shape[0], like.shape[1]
    send = torch.cat([p.reshape(-1) for p in send_pieces]) if send_pieces else like.new_empty(0)
    input_splits = [p.numel() for p in send_pieces]
    output_splits = [batch * channels * t for t in output_sizes]
    recv = _wait(_start_all_to_all(send.contiguous(), output_splits, input_splits, group))
    return [c.view(batch, channels, t) for c, t in zip(recv.split(output_splits), output_sizes)]


class _PreviousTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, halo: int, seq_sizes: tuple[int, ...], rank: int, group) -> Tensor:
        world = len(seq_sizes)
        spans_out = [halo_spans(list(seq_sizes), halo, rank, dst) for dst in range(world)]
        spans_in = [halo_spans(list(seq_sizes), halo, src, rank) for src in range(world)]
        ctx.spans_out, ctx.spans_in, ctx.group, ctx.n = spans_out, spans_in, group, x.shape[-1]
        pieces = [x[..., a:b] for a, b in spans_out]
        received = _exchange(pieces, [b - a for a, b in spans_in], x, group)
        return torch.cat(received, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes = [b - a for a, b in ctx.spans_in]
        pieces = list(grad.split(sizes, dim=-1))
        received = _exchange(pieces, [b - a for a, b in ctx.spans_out], grad, ctx.group)
        dx = grad.new_zeros(*grad.shape[:-1], ctx.n)
        for (a, b), piece in zip(ctx.spans_out, received):
            if b > a:
                dx[..., a:b] += piece
        return dx, None, None, None, None


def previous_tokens(x: Tensor, halo: int, seq_sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
    """The ``min(halo, offset)`` global tokens before this rank's shard, in sequence order.

    Args:
        x: (B, C, n_rank), this rank's tokens (sequence last).
        halo: how many previous tokens (K - 1 for a kernel of size K).
        seq_sizes: tokens per rank (DTensor ``Shard`` layout).

    Returns:
        (B, C, min(halo, offset of this rank)); autograd-aware (the backward sends the halo's
        gradient back to its owners).
    """
    return _PreviousTokens.apply(x, halo, tuple(seq_sizes), rank, group)
