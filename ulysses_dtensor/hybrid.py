"""Hybrid sequence parallelism: Ulysses all-to-all inside, ring attention across.

Plain Ulysses gives each of P ranks H/P query heads, so for P > H some ranks have no head and
sit idle while the others hold all N tokens. The hybrid splits the sp group into R ring
positions × U Ulysses ranks (P = U·R, U ≤ H): each Ulysses group of U ranks exchanges heads
with one all-to-all, after which every rank holds H/U heads of its group's N/R tokens; then the
R ranks that hold the same heads run ring attention over the R token blocks (``ring.py``), and
the output goes back with the second all-to-all. ``R = 1`` is plain Ulysses.

Causal balance: with contiguous blocks the last ring rank would do R times the work of the
first. When U is even, each Ulysses group instead takes the shards of a head chunk and its
mirror tail chunk (zigzag: 2R chunks, group r gets chunks r and 2R-1-r), so every ring rank
has the same causal work. The model's tokens stay in DTensor's contiguous ``Shard`` layout:
only the choice of which sp ranks form a Ulysses group changes, never a token's home.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import _mask_for_heads, check_attention_inputs, ulysses_attention
from .comm import exchange_head_to_seq, exchange_seq_to_head, group_rank_world
from .documents import Documents, as_documents
from .layout import UlyssesLayout, seq_shard_offsets
from .masks import CausalMask
from .ring import BlockMask, RingPlan, ring_attention

Tensor = torch.Tensor


def choose_ring_degree(sp: int, num_heads: int) -> int:
    """The ring factor R of ``sp = U · R``: 1 (plain Ulysses) when every rank gets a query head,
    else the smallest R whose Ulysses factor U = sp / R fits in ``num_heads``."""
    if sp < 1 or num_heads < 1:
        raise ValueError(f"sp and num_heads must be >= 1, got sp={sp}, num_heads={num_heads}")
    if num_heads >= sp:
        return 1
    return next(r for r in range(2, sp + 1) if sp % r == 0 and sp // r <= num_heads)


def ulysses_shards(sp: int, ring_degree: int) -> tuple[tuple[int, ...], ...]:
    """Per ring index r, the sp ranks (shard indices) of Ulysses group r, in increasing order.

    Zigzag when U = sp / R is even: group r takes chunks r and 2R-1-r of 2R equal chunks, so the
    causal work of every ring rank is equal. Contiguous blocks otherwise.
    """
    if ring_degree < 1 or sp % ring_degree:
        raise ValueError(f"ring_degree={ring_degree} must divide the sp degree {sp}")
    u = sp // ring_degree
    if ring_degree > 1 and u % 2 == 0:
        half = u // 2
        return tuple(
            tuple(range(r * half, (r + 1) * half)) + tuple(range((2 * ring_degree - 1 - r) * half, (2 * ring_degree - r) * half))
            for r in range(ring_degree)
        )
    return tuple(tuple(range(r * u, (r + 1) * u)) for r in range(ring_degree))


@dataclass(frozen=True)
class HybridLayout:
    """Which sp ranks form each Ulysses group of a U × R hybrid (pure arithmetic).

    Attributes:
        sp_size: P = U · R.
        shards: per ring index r, the sp ranks of Ulysses group r in increasing order
            (:func:`ulysses_shards`); the rank at place u of every group holds the same heads, so
            the R ranks at place u form one ring.
    """

    sp_size: int
    shards: tuple[tuple[int, ...], ...]

    @staticmethod
    def build(sp_size: int, ring_degree: int) -> "HybridLayout":
        return HybridLayout(sp_size, ulysses_shards(sp_size, ring_degree))

    @property
    def ring_degree(self) -> int:
        return len(self.shards)

    @property
    def ulysses_degree(self) -> int:
        return self.sp_size // self.ring_degree

    @property
    def balanced(self) -> bool:
        return self.ring_degree > 1 and self.ulysses_degree % 2 == 0

    def ring_index(self, sp_rank: int) -> int:
        return next(r for r, group in enumerate(self.shards) if sp_rank in group)

    def ring_members(self, sp_rank: int) -> tuple[int, ...]:
        """Per ring index, the sp rank in ``sp_rank``'s ring (same place in every group)."""
        place = self.shards[self.ring_index(sp_rank)].index(sp_rank)
        return tuple(group[place] for group in self.shards)

    def exchange_layout(self, layout: UlyssesLayout, sp_rank: int) -> UlyssesLayout:
        """The all-to-all of ``sp_rank``'s Ulysses group, written over all P sp ranks: members
        get their share of the heads and keep their tokens; the other ranks get no head and
        hold no token, so every split to or from them is empty."""
        group = self.shards[self.ring_index(sp_rank)]
        inner = UlyssesLayout.build(layout.batch, layout.num_heads, layout.num_kv_heads, layout.seq_len,
                                    layout.head_dim, len(group), layout.value_dim)
        q_ranges, kv_ranges, sizes = [(0, 0)] * self.sp_size, [(0, 0)] * self.sp_size, [0] * self.sp_size
        for place, r in enumerate(group):
            q_ranges[r], kv_ranges[r], sizes[r] = inner.q_ranges[place], inner.kv_ranges[place], layout.seq_sizes[r]
        return dataclasses.replace(inner, seq_sizes=tuple(sizes), q_ranges=tuple(q_ranges), kv_ranges=tuple(kv_ranges))

    def block_tokens(self, layout: UlyssesLayout) -> list[int]:
        """Tokens of each ring block (its Ulysses group's sp shards), by ring index."""
        return [sum(layout.seq_sizes[s] for s in group) for group in self.shards]

    def spans(self, layout: UlyssesLayout) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per ring index, the ``[start, stop)`` global position ranges of its group's tokens, in
        sp-rank (so increasing) order."""
        offsets = seq_shard_offsets(list(layout.seq_sizes))
        return tuple(tuple((offsets[s], offsets[s] + layout.seq_sizes[s]) for s in group) for group in self.shards)

    def describe(self, num_heads: int | None = None) -> str:
        heads = f" over {num_heads} query heads" if num_heads is not None else ""
        if self.ring_degree == 1:
            return f"sp={self.sp_size}{heads}: plain Ulysses (one all-to-all each way)"
        balance = "zigzag-balanced" if self.balanced else "contiguous blocks, causal work unbalanced"
        return (
            f"sp={self.sp_size}{heads}: hybrid {self.ulysses_degree}-way Ulysses (all-to-all) × "
            f"{self.ring_degree}-way ring attention ({balance})"
        )


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    ring_degree: int,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    seq_len: int | None = None,
    documents: Documents | Tensor | None = None,
) -> Tensor:
    """Exact attention over the global sequence with U-way Ulysses × R-way ring (module doc).

    Same contract as :func:`~ulysses_dtensor.attention.ulysses_attention`: q (B, H, N_r, D), k/v
    (B, H_kv, N_r, D) are this rank's tokens in the sp group's ``Shard`` layout; returns
    (B, H, N_r, Dv). ``ring_degree`` R must divide the sp degree P (:func:`choose_ring_degree`
    picks it); R = 1 is :func:`ulysses_attention` itself. For R > 1 the local kernel is the ring's
    own (``ring.py``), masks must be tensors (no flex BlockMask), and there is no dropout.

    Every collective runs over ``group`` itself (all-to-alls whose splits to ranks outside a
    Ulysses group or ring are empty): nothing creates process groups, and torch.compile traces it.
    """
    if ring_degree == 1:
        return ulysses_attention(
            q, k, v, group, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, seq_len=seq_len, documents=documents,
        )
    group, rank, world = group_rank_world(group)
    documents = as_documents(documents)
    if dropout_p:
        raise ValueError("hybrid Ulysses × ring attention has no dropout; use dropout_p=0")
    if isinstance(attn_mask, CausalMask):
        attn_mask = attn_mask.dense(q.device)  # the ring indexes a dense mask by token positions
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise ValueError(
            "hybrid Ulysses × ring attention takes a tensor attn_mask (or documents), not a flex "
            "BlockMask; use a tensor mask or UlyssesConfig(ring_degree=1)"
        )
    hybrid = HybridLayout.build(world, ring_degree)
    layout = check_attention_inputs(
        q, k, v, world=world, rank=rank, attn_mask=attn_mask, is_causal=is_causal,
        enable_gqa=enable_gqa, seq_len=seq_len, documents=documents,
    )
    inner = hybrid.exchange_layout(layout, rank)
    exchange = hybrid.ulysses_degree > 1  # U = 1: the ring alone, the tensors stay as they are
    q_h, k_h, v_h = exchange_seq_to_head(inner.qkv_plan(rank, group), q, k, v) if exchange else (q, k, v)
    # A rank without a head (only when ring_degree leaves U > H) still runs the ring, on empty
    # tensors: every ring step is a collective over the whole sp group.
    q_start, q_stop = inner.q_ranges[rank]
    spans = hybrid.spans(layout)
    ring = RingPlan(
        positions=tuple(torch.cat([torch.arange(a, b, device=q.device) for a, b in group]) for group in spans),
        spans=spans, index=hybrid.ring_index(rank), group_ranks=hybrid.ring_members(rank), group=group,
        group_size=world,
    )
    # the ring kernel always indexes (index_select / index_add): no native-GQA special case
    kv_index = torch.tensor(inner.local_kv_index(rank), dtype=torch.long, device=q.device)
    mask = BlockMask(
        is_causal=is_causal,
        doc_ids=documents.ids.to(q.device) if documents is not None else None,
        attn_mask=None if attn_mask is None else _mask_for_heads(attn_mask, inner.num_heads, q_start, q_stop),
    )
    out_h = ring_attention(q_h, k_h, v_h, ring, kv_index, mask, scale)
    if not exchange:
        return out_h
    return exchange_head_to_seq(inner.out_plan(rank, group), out_h)[0]


def hybrid_elements_sent(
    batch: int, num_heads: int, num_kv_heads: int, seq_len: int, head_dim: int, sp: int, ring_degree: int,
    sp_rank: int, value_dim: int | None = None,
) -> tuple[int, int]:
    """(forward, backward) elements ``sp_rank`` sends in one hybrid attention call: the two
    all-to-alls in its Ulysses group plus its ring hops (forward R-1 k/v blocks; backward R-1
    k/v blocks and R dk/dv blocks). The minimum for this placement."""
    value_dim = head_dim if value_dim is None else value_dim
    layout = UlyssesLayout.build(batch, num_heads, num_kv_heads, seq_len, head_dim, sp, value_dim)
    if ring_degree == 1:
        return layout.forward_elements_sent(sp_rank), layout.backward_elements_sent(sp_rank)
    hybrid = HybridLayout.build(sp, ring_degree)
    inner = hybrid.exchange_layout(layout, sp_rank)
    fwd, bwd = inner.forward_elements_sent(sp_rank), inner.backward_elements_sent(sp_rank)
    if inner.q_ranges[sp_rank][1] > inner.q_ranges[sp_rank][0]:
        kv = inner.kv_ranges[sp_rank][1] - inner.kv_ranges[sp_rank][0]
        tokens = hybrid.block_tokens(layout)
        index = hybrid.ring_index(sp_rank)
        held = [tokens[(index - step) % ring_degree] for step in range(ring_degree)]
        block = [batch * kv * n * (head_dim + value_dim) for n in held]
        fwd += sum(block[:-1])
        bwd += 2 * sum(block[:-1]) + block[-1]
    return fwd, bwd
