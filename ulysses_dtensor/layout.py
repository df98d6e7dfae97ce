"""Who holds what: sequence shards, head shards and the GQA key/value heads each rank needs.

Pure arithmetic, no communication: the split sizes, and the exchange plans
(:class:`ExchangePlan`) that ``comm.py`` runs, are made here and nowhere else, so the sequence layout always matches
DTensor's ``Shard(seq_dim)`` (``torch.chunk`` semantics), the head layout is the same on every
rank, and every module maps a query head to its key/value head with :func:`kv_head_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # annotation only: the layout needs no process group to be computed
    import torch.distributed as dist

HeadRange = tuple[int, int]  # [start, stop) of global head indices


@dataclass(frozen=True)
class ExchangePlan:
    """How a group of (B, H_i, *, D_i) tensors is split between ranks, for one fused all-to-all
    (``comm.py``). Built by the layout classes (:meth:`UlyssesLayout.plan`,
    ``mixers.ChannelExchange.plan``), not by hand.

    Attributes:
        heads: per tensor, the head range each rank owns in the head-sharded layout. Ranges may
            overlap between ranks (GQA kv heads read by several ranks); ``head_to_seq`` then sums.
        num_heads: per tensor, the global head count H_i.
        seq_sizes: tokens each rank owns in the sequence-sharded layout.
        rank: this rank's index in ``group``.
    """

    heads: tuple[tuple[HeadRange, ...], ...]
    num_heads: tuple[int, ...]
    seq_sizes: tuple[int, ...]
    rank: int
    group: dist.ProcessGroup

    @property
    def world(self) -> int:
        return len(self.seq_sizes)

    @staticmethod
    def by_kind(
        splits: Mapping[str, tuple[tuple[HeadRange, ...], int]],
        kinds: Sequence[str],
        seq_sizes: tuple[int, ...],
        rank: int,
        group: dist.ProcessGroup,
    ) -> "ExchangePlan":
        """The plan of tensors named by kind, in order: ``splits[kind]`` is (per-rank head
        ranges, global head count) of that kind of tensor in a layout class."""
        picked = [splits[kind] for kind in kinds]
        return ExchangePlan(
            heads=tuple(ranges for ranges, _ in picked),
            num_heads=tuple(count for _, count in picked),
            seq_sizes=seq_sizes,
            rank=rank,
            group=group,
        )


def seq_shard_sizes(seq_len: int, world: int) -> list[int]:
    """Tokens held by each rank when ``seq_len`` tokens are sharded over ``world`` ranks.

    Same rule as DTensor ``Shard`` / ``torch.chunk``: every rank but the last ones holds
    ``ceil(seq_len / world)`` tokens, so a DTensor's local shards and ours always agree.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if seq_len < world:
        raise ValueError(
            f"sequence length {seq_len} is shorter than the sequence-parallel degree {world}: "
            f"every rank needs at least one token; use sp <= {seq_len} or a longer sequence"
        )
    chunk = -(-seq_len // world)
    return [max(0, min(chunk, seq_len - r * chunk)) for r in range(world)]


def seq_shard_offsets(sizes: list[int]) -> list[int]:
    """Global index of each rank's first token."""
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


def head_ranges(num_heads: int, world: int) -> list[HeadRange]:
    """Contiguous query-head range of each rank after the all-to-all, balanced to within one.

    ``num_heads % world != 0`` gives the first ``num_heads % world`` ranks one extra head;
    ``num_heads < world`` leaves some ranks with no head (correct, but idle).
    """
    base, extra = divmod(num_heads, world)
    ranges, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def kv_head_of(head: int, num_heads: int, num_kv_heads: int) -> int:
    """The key/value head query head ``head`` reads under grouped-query attention: consecutive
    runs of ``num_heads // num_kv_heads`` query heads share one (SDPA's ``enable_gqa``, the
    models' ``repeat_interleave``). Also a Gated DeltaNet head's key head, a Mamba2 head's B/C
    group."""
    return head // (num_heads // num_kv_heads)


def kv_head_ranges(q_ranges: Sequence[HeadRange], num_heads: int, num_kv_heads: int) -> list[HeadRange]:
    """Key/value heads each rank needs for its query heads under grouped-query attention.

    Query head ``h`` reads key/value head :func:`kv_head_of` ``(h)``. A rank receives exactly the
    kv heads its query heads read, no more: with ``num_kv_heads < world`` several ranks receive
    the same kv head, never the ``world / num_kv_heads`` copies of repeating kv heads before the
    exchange. A rank with no query head gets ``(0, 0)``.
    """
    return [
        (kv_head_of(start, num_heads, num_kv_heads), kv_head_of(stop - 1, num_heads, num_kv_heads) + 1)
        if stop > start else (0, 0)
        for start, stop in q_ranges
    ]


def local_kv_index(q_range: HeadRange, kv_range: HeadRange, num_heads: int, num_kv_heads: int) -> list[int]:
    """For each query head of ``q_range`` in order, the position in ``kv_range`` (the kv heads
    a rank received, ``kv_head_ranges``) of the kv head it reads: ``len(q_range)`` entries."""
    return [kv_head_of(h, num_heads, num_kv_heads) - kv_range[0] for h in range(*q_range)]


@dataclass(frozen=True)
class UlyssesLayout:
    """The complete exchange plan of one attention call over ``world`` ranks.

    Attributes:
        seq_sizes: tokens per rank in the sequence-sharded layout.
        q_ranges: query heads per rank in the head-sharded layout.
        kv_ranges: key/value heads per rank in the head-sharded layout.
    """

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    seq_sizes: tuple[int, ...]
    q_ranges: tuple[HeadRange, ...]
    kv_ranges: tuple[HeadRange, ...]

    @staticmethod
    def build(
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        seq_len: int,
        head_dim: int,
        world: int,
        value_dim: int | None = None,
    ) -> "UlyssesLayout":
        q_ranges = head_ranges(num_heads, world)
        return UlyssesLayout(
            batch=batch,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            value_dim=head_dim if value_dim is None else value_dim,
            seq_sizes=tuple(seq_shard_sizes(seq_len, world)),
            q_ranges=tuple(q_ranges),
            kv_ranges=tuple(kv_head_ranges(q_ranges, num_heads, num_kv_heads)),
        )

    @property
    def world(self) -> int:
        return len(self.seq_sizes)

    @property
    def seq_len(self) -> int:
        return sum(self.seq_sizes)

    def plan(self, kinds: Sequence[str], rank: int, group: dist.ProcessGroup) -> ExchangePlan:
        """The fused exchange of tensors laid out by this layout, one kind per tensor in order:
        ``"q"`` for (B, H, *, D) tensors split like the query heads (q, the output, their
        gradients), ``"kv"`` for (B, H_kv, *, D) ones split like the key/value heads (k, v and
        their gradients)."""
        splits = {"q": (self.q_ranges, self.num_heads), "kv": (self.kv_ranges, self.num_kv_heads)}
        return ExchangePlan.by_kind(splits, kinds, self.seq_sizes, rank, group)

    def qkv_plan(self, rank: int, group: dist.ProcessGroup) -> ExchangePlan:
        """q, k, v in one exchange (forward in; dq, dk, dv back in backward)."""
        return self.plan(("q", "kv", "kv"), rank, group)

    def out_plan(self, rank: int, group: dist.ProcessGroup) -> ExchangePlan:
        """The attention output alone (forward back; its gradient in, in backward)."""
        return self.plan(("q",), rank, group)

    def local_kv_index(self, rank: int) -> list[int]:
        """Per query head of ``rank`` (``q_ranges[rank]`` in order), the position among its
        received kv heads (``kv_ranges[rank]``) of the kv head it reads."""
        return local_kv_index(self.q_ranges[rank], self.kv_ranges[rank], self.num_heads, self.num_kv_heads)

    def kv_expansion_index(self, rank: int) -> list[int] | None:
        """How ``rank``'s local kernel reads its received kv heads: None when it can take them
        as they are (one per query head, or every kv head read by an equally long run of
        consecutive query heads: native GQA); else :meth:`local_kv_index`, to expand one kv copy
        per query head with (the rank's query heads start or stop inside a group, so its kv
        heads are read by runs of different lengths). Local memory only: the exchange moves the
        same bytes either way."""
        index = self.local_kv_index(rank)
        n_q, n_kv = len(index), _width(self.kv_ranges[rank])
        if n_q == 0 or (n_q % n_kv == 0 and index == [j // (n_q // n_kv) for j in range(n_q)]):
            return None
        return index

    def forward_elements_sent(self, rank: int) -> int:
        """Elements ``rank`` sends in one forward: q/k/v out, then the attention output back.

        The minimum for this head assignment: every element sent is one the receiver reads and
        does not hold.
        """
        qkv = [self._qkv_width(dst) for dst in range(self.world)]
        out = [_width(r) * self.value_dim for r in self.q_ranges]
        return self._seq_to_head_elements(rank, qkv) + self._head_to_seq_elements(rank, out)

    def backward_elements_sent(self, rank: int) -> int:
        """Elements ``rank`` sends in one backward: grad of the output in, dq/dk/dv back.

        Equal to the forward count when P divides N and the heads; with uneven shards the two
        directions swap who sends the k/v part, so the counts can differ.
        """
        grad_out = [_width(r) * self.value_dim for r in self.q_ranges]
        qkv = [self._qkv_width(dst) for dst in range(self.world)]
        return self._seq_to_head_elements(rank, grad_out) + self._head_to_seq_elements(rank, qkv)

    def head_chunked_backward_elements_sent(self, rank: int) -> int:
        """Elements ``rank`` sends in one backward of ``head_chunks.py``: the plain backward's,
        plus q, k and v to the head layout again (the chunked forward saves no head layout)."""
        qkv = [self._qkv_width(dst) for dst in range(self.world)]
        return self.backward_elements_sent(rank) + self._seq_to_head_elements(rank, qkv)

    def _qkv_width(self, rank: int) -> int:
        """Elements per token of the q, k and v heads ``rank`` owns in the head layout."""
        return _width(self.q_ranges[rank]) * self.head_dim + _width(self.kv_ranges[rank]) * (
            self.head_dim + self.value_dim
        )

    def _seq_to_head_elements(self, rank: int, width: list[int]) -> int:
        # Each destination receives this rank's tokens of the heads it owns.
        n_own = self.seq_sizes[rank]
        return sum(self.batch * n_own * width[d] for d in range(self.world) if d != rank)

    def _head_to_seq_elements(self, rank: int, width: list[int]) -> int:
        # Each destination receives its own tokens of the heads this rank owns.
        return sum(self.batch * self.seq_sizes[d] * width[rank] for d in range(self.world) if d != rank)


def _width(r: HeadRange) -> int:
    return r[1] - r[0]


def channel_ranges(num_heads: int, head_dim: int, world: int) -> list[HeadRange]:
    """Value channels (of the flattened ``(num_heads, head_dim)``) each rank owns in the channel
    layout of a linear-attention or state-space mixer, whose value channels evolve independently.

    ``world <= num_heads``: whole heads, balanced as :func:`head_ranges`. Beyond the head count
    every rank gets a slice of one head's channels: the ranks are spread over the heads (the
    first heads get one extra rank) and each head's channels over its ranks, so no rank idles.
    """
    if world <= num_heads:
        return [(a * head_dim, b * head_dim) for a, b in head_ranges(num_heads, world)]
    ranks_per_head = [b - a for a, b in head_ranges(world, num_heads)]
    if max(ranks_per_head) > head_dim:
        raise ValueError(
            f"sp={world} exceeds the {num_heads} heads × {head_dim} channels of a sequence mixer: "
            "every rank needs at least one value channel"
        )
    ranges = []
    for head, ranks in enumerate(ranks_per_head):
        ranges += [(head * head_dim + a, head * head_dim + b) for a, b in head_ranges(head_dim, ranks)]
    return ranges


def covering_ranges(ranges: list[HeadRange], unit: int) -> list[HeadRange]:
    """The units of size ``unit`` (heads of channels, groups of heads) each range touches:
    [start // unit, ceil(stop / unit)), empty for an empty range."""
    return [(a // unit, (b - 1) // unit + 1) if b > a else (0, 0) for a, b in ranges]
