"""Ring attention: queries stay, key/value blocks travel around a ring of ranks.

Each of R ranks holds a block of the sequence for the same heads: its queries and the keys and
values of the same tokens (any token set; the positions say which). In R steps every rank sees
every key/value block: it attends its queries to the block it holds, merges the partial result
into a running output by log-sum-exp (online softmax), and passes the block on. Backward runs
the ring again with the forward's global log-sum-exp (the flash-attention backward identity), so
no ``N × N`` tensor is ever saved; the key/value gradients travel with their blocks and arrive at
their owners after one last hop.

Communication per rank (each hop an ``all_to_all_single`` with a single non-empty split, i.e. a
send to the next rank and a receive from the previous one; NCCL skips the empty splits, and no
process group has to be created for the ring): forward ``(R-1)`` k/v hops, each started before
the current block is computed and waited for after it, so the transfer overlaps the compute;
backward ``(R-1)`` k/v hops (overlapped the same way) and ``R`` dk/dv hops (after each block's
gradients, which they carry).

Masks are built per block from global token positions (causal, packed documents, a global tensor
``attn_mask``), so the ring is exact for any token placement, including zigzag (head-tail)
placements that balance causal work. The block kernel is plain matmul + log-sum-exp in torch ops,
chunked over queries to bound its transient memory, so it runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import _pack, _start_all_to_all, _wait

Tensor = torch.Tensor

# Transient score-matrix elements per query chunk (B · H · chunk · n_kv): bounds the block
# kernel's memory at a few tens of MiB while keeping the matmuls large.
SCORE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RingPlan:
    """Who is where on the ring.

    Attributes:
        positions: per ring index, the global positions of that rank's tokens, ``(n_i,)`` int64.
        spans: the same positions as increasing ``[start, stop)`` ranges (Python ints), so which
            blocks a causal mask hides entirely is known without reading a tensor (nor a graph
            break under torch.compile).
        index: this rank's ring index.
        group_ranks: per ring index, its rank in ``group``.
        group: a process group holding the ring's ranks (it may hold more: the hybrid runs
            several rings in its sp group; the others' splits are empty).
        group_size: the size of ``group``.
    """

    positions: tuple[Tensor, ...]
    spans: tuple[tuple[tuple[int, int], ...], ...]
    index: int
    group_ranks: tuple[int, ...]
    group: dist.ProcessGroup
    group_size: int

    @property
    def size(self) -> int:
        return len(self.positions)

    def block_at_step(self, step: int) -> int:
        """Ring index of the key/value block this rank holds at ``step`` (0 = its own)."""
        return (self.index - step) % self.size

    def first_position(self, block: int) -> int | None:
        """The smallest position in ``block``, None if it is empty."""
        spans = [sp for sp in self.spans[block] if sp[1] > sp[0]]
        return spans[0][0] if spans else None

    def last_query_position(self, stop_row: int) -> int:
        """The position of this rank's row ``stop_row - 1`` (rows follow the spans in order)."""
        row = stop_row - 1
        for start, stop in self.spans[self.index]:
            if row < stop - start:
                return start + row
            row -= stop - start
        raise IndexError(stop_row)

    def hidden_by_causal(self, mask: "BlockMask", block: int, stop_row: int) -> bool:
        """True when a causal mask hides ``block`` from this rank's rows before ``stop_row``:
        their keys all come after the rows' last query. Such chunks are skipped, not computed."""
        first = self.first_position(block)
        return mask.is_causal and (first is None or first > self.last_query_position(stop_row))


@dataclass(frozen=True)
class BlockMask:
    """What a query may attend to, in global positions: causal, packed documents, a tensor mask.

    ``doc_ids``: (B|1, N) document id per global position or None. ``attn_mask``: the global
    mask of this rank's heads, (B|1, H_r|1, N, N), bool (True = attend) or additive, or None.
    """

    is_causal: bool
    doc_ids: Tensor | None
    attn_mask: Tensor | None

    def build(self, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(allowed bool, additive bias) for queries ``q_pos`` against keys ``k_pos``, each
        broadcastable to (B, H, n_q, n_k), or None when there is nothing to apply."""
        allowed = bias = None
        if self.is_causal:
            allowed = (q_pos[:, None] >= k_pos[None, :])[None, None]
        if self.doc_ids is not None:
            same = (self.doc_ids[:, q_pos][:, :, None] == self.doc_ids[:, k_pos][:, None, :])[:, None]
            allowed = same if allowed is None else allowed & same
        if self.attn_mask is not None:
            m = self.attn_mask.index_select(2, q_pos).index_select(3, k_pos)
            if m.dtype == torch.bool:
                allowed = m if allowed is None else allowed & m
            else:
                bias = m
        return allowed, bias


def _scores(q: Tensor, k: Tensor, scale: float, allowed: Tensor | None, bias: Tensor | None) -> Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _finite(lse: Tensor) -> Tensor:
    # A query with no allowed key in a block has lse = -inf; exp(s - 0) of its -inf scores is 0.
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _chunks(q: Tensor, n_k: int):
    per_row = max(1, q.shape[0] * q.shape[1] * max(n_k, 1))
    size = max(1, SCORE_CHUNK_ELEMENTS // per_row)
    for start in range(0, q.shape[2], size):
        yield start, min(start + size, q.shape[2])


def _block_forward(q, k, v, plan: RingPlan, block: int, mask: BlockMask, scale: float):
    """Partial attention of this rank's q (B, H, n_q, D) over one block k/v (B, H, n_k, D):
    (out (B, H, n_q, Dv), lse (B, H, n_q))."""
    q_pos, k_pos = plan.positions[plan.index], plan.positions[block]
    if q.shape[2] == 0:  # a rank whose group holds no token (very short uneven sequences)
        return q.new_zeros(q.shape[:3] + (v.shape[3],)), q.new_zeros(q.shape[:3])
    outs, lses = [], []
    for a, b in _chunks(q, k.shape[2]):
        if plan.hidden_by_causal(mask, block, b):
            outs.append(q.new_zeros(q.shape[:2] + (b - a, v.shape[3])))
            lses.append(q.new_full(q.shape[:2] + (b - a,), float("-inf")))
            continue
        allowed, bias = mask.build(q_pos[a:b], k_pos)
        s = _scores(q[:, :, a:b], k, scale, allowed, bias)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(lse)[..., None])
        outs.append(torch.matmul(p, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_partials(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two key sets from the attention over each: outputs
    (..., n, Dv) weighted by their log-sum-exps (..., n); the merged (output, log-sum-exp).
    A query that sees no key of either set (lse = -inf) keeps weight 0, never NaN."""
    new = torch.logaddexp(lse, lse_b)
    base = _finite(new)
    out = out * torch.exp(lse - base)[..., None] + out_b * torch.exp(lse_b - base)[..., None]
    return out, new


@dataclass
class _InFlight:
    """Transfers started by :func:`_start_shift`: per dtype (un-waited result, indices, shapes);
    or, on a ring of one rank, the tensors themselves (nothing travels)."""

    transfers: list[tuple[Tensor, list[int], list[torch.Size]]]
    local: list[Tensor] | None = None


def _start_shift(plan: RingPlan, tensors: list[Tensor], incoming_shapes: list[torch.Size]) -> _InFlight:
    """Start sending ``tensors`` to the next ring rank and receiving tensors of
    ``incoming_shapes`` from the previous one: one collective per dtype, not yet waited.
    ``tensors`` are copied into the send buffer, so the caller may keep computing with them."""
    if plan.size == 1:
        return _InFlight([], local=tensors)
    nxt = plan.group_ranks[(plan.index + 1) % plan.size]
    prv = plan.group_ranks[(plan.index - 1) % plan.size]
    transfers = []
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        send = _pack([tensors[i] for i in idx], tensors[idx[0]])
        in_splits = [0] * plan.group_size
        in_splits[nxt] = send.numel()
        out_splits = [0] * plan.group_size
        out_splits[prv] = sum(math.prod(incoming_shapes[i]) for i in idx)
        result = _start_all_to_all(send, out_splits, in_splits, plan.group)
        transfers.append((result, idx, [incoming_shapes[i] for i in idx]))
    return _InFlight(transfers)


def _finish_shift(in_flight: _InFlight) -> list[Tensor]:
    """Wait for the transfers; the received tensors, in the order they were sent."""
    if in_flight.local is not None:
        return in_flight.local
    out: dict[int, Tensor] = {}
    for result, idx, shapes in in_flight.transfers:
        recv, offset = _wait(result), 0
        for i, shape in zip(idx, shapes):
            n = math.prod(shape)
            out[i] = recv[offset : offset + n].view(shape)
            offset += n
    return [out[i] for i in range(len(out))]


def _block_shape(plan: RingPlan, like: Tensor, block: int) -> torch.Size:
    return torch.Size((like.shape[0], like.shape[1], plan.positions[block].numel(), like.shape[3]))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, kv_index: Tensor, mask: BlockMask, scale: float):
        acc = torch.promote_types(q.dtype, torch.float32)
        qa = q.to(acc)
        out = q.new_zeros(q.shape[:3] + (v.shape[3],), dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
        k_cur, v_cur = k, v
        for step in range(plan.size):
            block = plan.block_at_step(step)
            in_flight = None
            if step < plan.size - 1:  # the next block travels while this one is computed
                nxt = plan.block_at_step(step + 1)
                in_flight = _start_shift(plan, [k_cur, v_cur], [_block_shape(plan, k, nxt), _block_shape(plan, v, nxt)])
            out_b, lse_b = _block_forward(
                qa, k_cur.index_select(1, kv_index).to(acc), v_cur.index_select(1, kv_index).to(acc),
                plan, block, mask, scale,
            )
            out, lse = merge_partials(out, lse, out_b, lse_b)
            if in_flight is not None:
                k_cur, v_cur = _finish_shift(in_flight)
        ctx.save_for_backward(q, k, v, out, lse, kv_index)
        ctx.plan, ctx.mask, ctx.scale = plan, mask, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, kv_index = ctx.saved_tensors
        plan, mask, scale = ctx.plan, ctx.mask, ctx.scale
        acc = out.dtype
        q_pos = plan.positions[plan.index]
        qa, do = q.to(acc), grad_out.to(acc)
        delta = (do * out).sum(-1)  # (B, H, n_q): rowsum(dO ∘ O) of the global softmax
        lse_f = _finite(lse)
        dq = torch.zeros_like(qa)
        k_cur, v_cur = k, v
        dk_cur = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv_cur = torch.zeros(v.shape, dtype=acc, device=v.device)
        for step in range(plan.size):
            block = plan.block_at_step(step)
            k_pos = plan.positions[block]
            nxt = plan.block_at_step(step + 1)
            shapes = [_block_shape(plan, k, nxt), _block_shape(plan, v, nxt)]
            # the next block's k/v travel during this block's gradients; dk/dv must wait for them
            kv_in_flight = _start_shift(plan, [k_cur, v_cur], shapes) if step < plan.size - 1 else None
            ke = k_cur.index_select(1, kv_index).to(acc)
            ve = v_cur.index_select(1, kv_index).to(acc)
            dke = torch.zeros_like(ke)
            dve = torch.zeros_like(ve)
            for a, b in _chunks(qa, ke.shape[2]):
                if plan.hidden_by_causal(mask, block, b):
                    continue
                allowed, bias = mask.build(q_pos[a:b], k_pos)
                s = _scores(qa[:, :, a:b], ke, scale, allowed, bias)
                p = torch.exp(s - lse_f[:, :, a:b, None])
                dve += torch.matmul(p.transpose(-1, -2), do[:, :, a:b])
                dp = torch.matmul(do[:, :, a:b], ve.transpose(-1, -2))
                ds = p * (dp - delta[:, :, a:b, None])
                dq[:, :, a:b] += torch.matmul(ds, ke) * scale
                dke += torch.matmul(ds.transpose(-1, -2), qa[:, :, a:b]) * scale
            # query heads sharing a kv head (GQA) sum into it
            dk_cur = dk_cur.index_add(1, kv_index, dke)
            dv_cur = dv_cur.index_add(1, kv_index, dve)
            # after the last step this hop takes each block's finished gradient home
            dk_cur, dv_cur = _finish_shift(_start_shift(plan, [dk_cur, dv_cur], shapes))
            if kv_in_flight is not None:
                k_cur, v_cur = _finish_shift(kv_in_flight)
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: RingPlan, kv_index: Tensor, mask: BlockMask, scale: float | None = None,
) -> Tensor:
    """Exact attention of this rank's queries over the keys/values of every ring rank.

    Args:
        q: (B, H_r, n, D) queries of this rank's tokens (``plan.positions[plan.index]``).
        k, v: (B, K_r, n, D) and (B, K_r, n, Dv), the same tokens' keys and values.
        plan: the ring (:class:`RingPlan`); every rank's token positions.
        kv_index: (H_r,) int64, the local kv head each local query head reads (GQA).
        mask: :class:`BlockMask` in global positions.
        scale: softmax scale; default ``1/sqrt(D)``.

    Returns:
        (B, H_r, n, Dv) in q's dtype (accumulated in at least float32).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, plan, kv_index, mask, scale)
