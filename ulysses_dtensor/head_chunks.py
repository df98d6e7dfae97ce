"""Head-chunked Ulysses attention: full-sequence q/out exist for a fraction of the heads at a time.

Plain Ulysses attention holds, per rank, its ``H/P`` query heads over all ``N`` tokens (q, the
output, and in backward dO and dq) and saves the head-layout q, k, v, output and logsumexp for
backward. With ``head_chunks = C`` the query heads of every rank are processed in ``C`` chunks:

forward, per chunk ``j``: all-to-all of the chunk's q heads (chunk 0 also carries k and v, which
stay received for the whole call), the local kernel, all-to-all of the chunk's output back into
the sequence layout. Saved for backward: only the sequence-layout q, k, v (this rank's tokens).

backward: k and v are received again (fused into chunk 0's exchange with that chunk's q and dO);
per chunk the kernel's forward is recomputed on the received heads and its own backward gives
dq, dk, dv; each chunk's dq goes back with its exchange, dk and dv (summed over chunks) with the
last one.

The exchanges are pipelined: chunk j+1's q (in backward also its dO) and chunk j-1's output
(dq) are in flight while chunk j's kernel runs (functional all-to-alls issued before and waited
after it; NCCL runs them on its own stream, gloo on its thread).

Bytes per forward are those of plain Ulysses; backward also receives q, k and v again (what full
activation checkpointing's recomputed forward exchange moves), in exchange for never saving the
head layout. Collectives: ``2·C`` per forward and ``2·C`` per backward. A rank with fewer heads
in a chunk (``H % P != 0``) sends and receives an empty slice, so every rank issues the same
collectives. Any kernel with autograd works; dropout does not (its recompute would draw other
masks), nor ring hybrids.

Under ``activation_checkpointing="offload"`` the forward's outputs are kept (in host memory,
with the block inputs) and the block's recompute takes them instead of exchanging again
(:data:`output_stash`): per layer the bytes are then the forward's plus the backward's (which
re-receives q, k, v), less than full checkpointing's forward, recomputed forward and backward.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable, Protocol

import torch

from .comm import _head_to_seq_finish, _head_to_seq_start, _profiled, _seq_to_head_finish, _seq_to_head_start
from .layout import HeadRange, UlyssesLayout

Tensor = torch.Tensor


def chunk_head_ranges(q_ranges: tuple[HeadRange, ...], chunks: int) -> list[tuple[HeadRange, ...]]:
    """Each rank's query heads cut into consecutive pieces of ``ceil(H_max / chunks)`` heads
    (``H_max``: the most heads a rank holds): ``min(chunks, H_max)`` pieces, a rank's later ones
    possibly empty (``H % P != 0``)."""
    most = max(max(stop - start for start, stop in q_ranges), 1)
    size = -(-most // chunks)
    chunks = -(-most // size)
    return [
        tuple((min(start + j * size, stop), min(start + (j + 1) * size, stop)) for start, stop in q_ranges)
        for j in range(chunks)
    ]


@dataclasses.dataclass(frozen=True)
class _ChunkPlans:
    """The exchanges of one head-chunked call."""

    layout: UlyssesLayout
    rank: int
    group: object
    q_chunks: list[tuple[HeadRange, ...]]

    def to_heads(self, j: int, tensors: tuple, with_kv: tuple = ()):
        """Issue chunk ``j``'s exchange of query-head tensors (q, or q and dO) to the head layout;
        ``with_kv`` (k, v) ride along in the same collective. ``_seq_to_head_finish`` of the
        result waits and gives the tensors: compute in between overlaps the transfer."""
        plan = self.chunk_layout(j).plan(("q",) * len(tensors) + ("kv",) * len(with_kv), self.rank, self.group)
        return _seq_to_head_start(plan, (*tensors, *with_kv))

    def to_seq(self, j: int, out_h: Tensor, with_kv: tuple = ()):
        """Issue chunk ``j``'s exchange of head-layout ``out_h`` back to this rank's tokens:
        ``_head_to_seq_finish`` gives (B, heads of chunk j over all ranks, N_r, D) in rank order,
        then ``with_kv`` (dk, dv), summed into (B, H_kv, N_r, D)."""
        plan = self.packed_chunk_layout(j).plan(("q",) + ("kv",) * len(with_kv), self.rank, self.group)
        return _head_to_seq_start(plan, (out_h, *with_kv))

    def global_heads(self, j: int, device) -> Tensor:
        return torch.tensor([h for start, stop in self.q_chunks[j] for h in range(start, stop)], device=device,
                            dtype=torch.long)

    def chunk_layout(self, j: int) -> UlyssesLayout:
        """The layout ``attention.local_attention`` sees for chunk ``j``: its query heads, the
        rank's whole kv range (received once)."""
        return dataclasses.replace(self.layout, q_ranges=self.q_chunks[j])

    def packed_chunk_layout(self, j: int) -> UlyssesLayout:
        """Chunk ``j``'s way back: its query heads alone, renumbered 0.. in rank order (an
        ordered partition of ``num_heads`` = the chunk's head count, so the exchange
        concatenates, no zero fill); the kv heads as in :meth:`chunk_layout`. For exchange plans
        only: the query heads no longer index the kv heads."""
        packed, offset = [], 0
        for start, stop in self.q_chunks[j]:
            packed.append((offset, offset + stop - start))
            offset += stop - start
        return dataclasses.replace(self.layout, num_heads=offset, q_ranges=tuple(packed))


class OutputStash(Protocol):
    """Where a recomputing checkpoint keeps the outputs of a block's attention calls."""

    def record(self, out: Tensor) -> None: ...  # the forward: keep this call's output

    def replay(self) -> Tensor | None: ...  # the recompute: the next call's output (None: compute)


# set by offload.py around a block's forward (recording) and its recompute (replaying)
output_stash: contextvars.ContextVar[OutputStash | None] = contextvars.ContextVar("output_stash", default=None)


class _HeadChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plans: _ChunkPlans, attend: Callable, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx.plans, ctx.attend = plans, attend
        ctx.save_for_backward(q, k, v)
        stash = output_stash.get()
        if stash is not None:
            replayed = stash.replay()
            if replayed is not None:
                return replayed
        out = _chunked_forward(plans, attend, q, k, v)
        if stash is not None:
            stash.record(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (None, None, *_chunked_backward(ctx.plans, ctx.attend, *ctx.saved_tensors, grad_out))


def _chunked_forward(plans: _ChunkPlans, attend: Callable, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # pipelined: chunk j+1's q and chunk j-1's output are in flight while chunk j's kernel runs
    chunks = len(plans.q_chunks)
    out = None
    with _profiled("ulysses_dtensor::head_chunked_attention"):
        incoming = plans.to_heads(0, (q,), with_kv=(k, v))
        outgoing = None
        for j in range(chunks):
            received = _seq_to_head_finish(incoming)
            q_c = received[0]
            if j == 0:
                k_h, v_h = received[1], received[2]
            if j + 1 < chunks:
                incoming = plans.to_heads(j + 1, (q,))
            out_c = attend(q_c, k_h, v_h, plans.chunk_layout(j))
            del q_c, received
            if outgoing is not None:
                out = _place(out, plans, *outgoing, q)
            outgoing = (j, plans.to_seq(j, out_c))
            del out_c
        return _place(out, plans, *outgoing, q)


def _place(out: Tensor | None, plans: _ChunkPlans, j: int, pending, q: Tensor) -> Tensor:
    """Wait for chunk ``j``'s exchange back and write it at its heads of ``out``."""
    return _write_chunk(out, plans, j, _head_to_seq_finish(pending)[0], q)


def _chunked_backward(plans: _ChunkPlans, attend: Callable, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor):
    # pipelined like the forward: chunk j+1's q and dO, and chunk j-1's dq, move during chunk j
    grad_out = grad_out.contiguous()
    chunks = len(plans.q_chunks)
    dq = None
    dk_h = dv_h = None
    with _profiled("ulysses_dtensor::head_chunked_attention_backward"):
        incoming = plans.to_heads(0, (q, grad_out), with_kv=(k, v))
        outgoing = None
        for j in range(chunks):
            last = j == chunks - 1
            received = _seq_to_head_finish(incoming)
            q_c, dout_c = received[0], received[1]
            if j == 0:
                k_h, v_h = received[2].requires_grad_(), received[3].requires_grad_()
            del received
            if not last:
                incoming = plans.to_heads(j + 1, (q, grad_out))
            q_c.requires_grad_()
            with torch.enable_grad():
                out_c = attend(q_c, k_h, v_h, plans.chunk_layout(j))
                dq_c, dk_c, dv_c = torch.autograd.grad(out_c, (q_c, k_h, v_h), dout_c, allow_unused=True)
            # the first chunk's dk/dv are the accumulators (no zero-filled copies)
            dk_h = _accumulate(dk_h, dk_c, k_h)
            dv_h = _accumulate(dv_h, dv_c, v_h)
            if dq_c is None:
                dq_c = torch.zeros_like(q_c)
            del out_c, q_c, dout_c, dk_c, dv_c
            if outgoing is not None:
                dq = _place(dq, plans, *outgoing, q)
            outgoing = (j, plans.to_seq(j, dq_c, with_kv=(dk_h, dv_h) if last else ()))
            del dq_c
        j, pending = outgoing
        results = _head_to_seq_finish(pending)
        dk, dv = results[1], results[2]
        dq = _write_chunk(dq, plans, j, results[0], q)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _write_chunk(out: Tensor | None, plans: _ChunkPlans, j: int, seq_c: Tensor, q: Tensor) -> Tensor:
    """``out`` (allocated on first use; every head is written by exactly one chunk) with chunk
    ``j``'s heads ``seq_c`` in place; a single chunk holds every head in order: it is the result."""
    if len(plans.q_chunks) == 1:
        return seq_c
    if out is None:
        out = seq_c.new_empty(q.shape[0], plans.layout.num_heads, q.shape[2], seq_c.shape[-1])
    return out.index_copy_(1, plans.global_heads(j, q.device), seq_c)


def _accumulate(total: Tensor | None, grad: Tensor | None, like: Tensor) -> Tensor | None:
    if grad is None:
        return total if total is not None else torch.zeros_like(like)
    if total is None:
        return grad
    return total.add_(grad)


def head_chunked_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: UlyssesLayout, rank: int, group, chunks: int,
    attend: Callable[[Tensor, Tensor, Tensor, UlyssesLayout], Tensor],
) -> Tensor:
    """Ulysses attention of this rank's tokens in ``chunks`` chunks of query heads.

    q: (B, H, N_r, D), k/v: (B, H_kv, N_r, D) plain local shards, checked already
    (``attention.check_attention_inputs``). ``attend(q_h, k_h, v_h, chunk_layout)`` runs the local
    kernel on one chunk: q_h (B, chunk heads, N, D) and the rank's kv heads. Returns
    (B, H, N_r, Dv)."""
    plans = _ChunkPlans(layout, rank, group, chunk_head_ranges(layout.q_ranges, chunks))
    return _HeadChunkedAttention.apply(plans, attend, q, k, v)


def check_head_chunks(chunks: int, dropout_p: float) -> None:
    """Refuse what the recomputing backward cannot make exact (before any collective)."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"head_chunks must be an integer >= 1, got {chunks!r}")
    if chunks > 1 and dropout_p:
        raise ValueError(
            f"head_chunks={chunks} with dropout_p={dropout_p}: the chunked backward recomputes the kernel, "
            "which would draw different dropout masks; use head_chunks=1 or no attention dropout"
        )

