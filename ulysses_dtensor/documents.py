"""Packed documents: several documents concatenated along the sequence attend only within each one.

After the sequence->head all-to-all every rank holds the *whole* sequence for its heads, so the
document structure of the global sequence is all a rank needs to mask its attention locally:
no extra collective, no change to the exchange. :class:`Documents` holds that structure — one
integer document id per token of the global sequence, ``(B, N)`` or ``(N,)``, non-decreasing
along the sequence (every document is one contiguous run) — and builds, once per forward and
shared by every layer, what each kernel needs:

* SDPA: the sequence is cut at document boundaries into chunks of whole documents of at most
  ``chunk_tokens`` tokens (a longer document is a chunk by itself). A chunk with one document runs
  plain SDPA (``is_causal``, no mask, flash-capable); a chunk with several gets its own
  block-diagonal ``(L, L)`` bool mask. No ``N × N`` tensor exists: masks total at most
  ``chunk_tokens · N`` bools per batch row. ``chunk_tokens=None`` (and every traced/compiled call,
  whose shapes cannot depend on data) uses one dense ``(B, 1, N, N)`` bool mask instead.
* flex_attention: a document BlockMask whose block structure is computed from per-block document
  ranges (``O(B · (N/128)²)`` memory, never the ``B · N²`` dense mask ``create_block_mask`` would
  evaluate) and whose ``mask_mod`` compares document ids.
* flash-attn: ``cu_seqlens`` / ``max_seqlen`` for ``flash_attn_varlen_func`` (batch rows flattened;
  documents never cross rows).

With ``is_causal`` attention is causal within each document; without it, bidirectional within
each document. A tensor ``attn_mask`` is intersected with the document mask.
"""

from __future__ import annotations

import torch

from .masks import CausalMask

Tensor = torch.Tensor

DEFAULT_CHUNK_TOKENS = 2048


class Documents:
    """The packed documents of a global sequence.

    Args:
        ids: integer document id of every token of the *global* sequence, ``(B, N)`` or ``(N,)``
            (one row shared by the whole batch); non-decreasing along the sequence. Every sp rank
            passes the same tensor. Only equality of neighbours matters: ``[0, 0, 5, 5, 5, 9]``
            is three documents of 2, 3 and 1 tokens.
        chunk_tokens: SDPA chunk size (see the module docstring); ``None``: one dense mask.

    Build it once per step (e.g. :meth:`from_position_ids`) and pass it to every layer's
    ``ulysses_attention(..., documents=...)``: the masks are built on first use and cached.
    """

    def __init__(self, ids: Tensor, *, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):
        if not isinstance(ids, Tensor):
            raise TypeError(f"document ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"document ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(f"document ids must be (N,) or (B, N) with N > 0, got shape {tuple(ids.shape)}")
        if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
        ids = ids.reshape(-1, ids.shape[-1])
        checkable = not torch.compiler.is_compiling() and ids.device.type != "meta"
        if checkable and ids.shape[1] > 1 and bool((ids[:, 1:] < ids[:, :-1]).any()):
            row, pos = (ids[:, 1:] < ids[:, :-1]).nonzero()[0].tolist()
            raise ValueError(
                f"document ids must be non-decreasing along the sequence (each document one contiguous "
                f"run of tokens); row {row} goes from {ids[row, pos].item()} to {ids[row, pos + 1].item()} "
                f"at token {pos + 1}"
            )
        self.ids = ids
        self.chunk_tokens = chunk_tokens
        self._cache: dict = {}

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_position_ids(cls, position_ids: Tensor, **kwargs) -> "Documents":
        """Documents of a packed batch from its positions ``(B, N)`` or ``(N,)``: a document starts
        wherever a position is not the previous one + 1 — transformers' rule
        (``find_packed_sequence_indices``; ``DataCollatorWithFlattening`` restarts positions at 0)."""
        if not isinstance(position_ids, Tensor) or position_ids.dim() not in (1, 2) or position_ids.dtype.is_floating_point:
            raise ValueError(
                "position_ids must be an integer tensor (N,) or (B, N), got "
                f"{getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                f"{tuple(getattr(position_ids, 'shape', ()))}"
            )
        pos = position_ids.reshape(-1, position_ids.shape[-1])
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        return cls(starts.cumsum(1) - 1, **kwargs)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor | list[int], seq_len: int, **kwargs) -> "Documents":
        """Documents from flash-attn style cumulative lengths ``[0, l_0, l_0 + l_1, ..., total]``
        over ``total = B · seq_len`` tokens (batch rows flattened; no document crosses a row)."""
        cu = torch.as_tensor(cu_seqlens).reshape(-1).long()
        if cu.numel() < 2 or cu[0].item() != 0 or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0 and be strictly increasing, got {cu.tolist()}")
        total = cu[-1].item()
        if seq_len < 1 or total % seq_len:
            raise ValueError(f"cu_seqlens cover {total} tokens, not a multiple of seq_len={seq_len}")
        rows = torch.arange(seq_len, total, seq_len, device=cu.device)
        if not bool(torch.isin(rows, cu).all()):
            raise ValueError(f"cu_seqlens {cu.tolist()} has a document crossing a batch row of {seq_len} tokens")
        ids = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])
        return cls(ids.view(total // seq_len, seq_len), **kwargs)

    # -- shape ---------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        """Rows of ids: 1 (shared by every batch row) or B."""
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def check(self, batch: int, seq_len: int, device: torch.device) -> None:
        """Raise unless these documents describe a global sequence of ``(batch, seq_len)``."""
        if self.seq_len != seq_len:
            raise ValueError(
                f"document ids cover {self.seq_len} tokens but the global sequence is {seq_len}: pass the "
                "ids of the whole sequence (every rank the same), not this rank's shard"
            )
        if self.batch not in (1, batch):
            raise ValueError(f"document ids have {self.batch} rows but the batch is {batch} (give 1 or {batch})")
        if self.ids.device != device:
            raise ValueError(f"document ids are on {self.ids.device} but q is on {device}")

    def _cached(self, key, build):
        if torch.compiler.is_compiling():
            return build()
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- structure (one host sync, cached) -----------------------------------------------------

    def starts(self) -> list[list[int]]:
        """Per row of ids, the first token of every document, then N."""

        def build():
            ids = self.ids
            change = torch.zeros_like(ids, dtype=torch.bool)
            change[:, 1:] = ids[:, 1:] != ids[:, :-1]
            change[:, 0] = True
            rows = [[] for _ in range(self.batch)]
            for row, pos in change.nonzero().tolist():
                rows[row].append(pos)
            return [r + [self.seq_len] for r in rows]

        return self._cached("starts", build)

    def num_documents(self) -> list[int]:
        return [len(s) - 1 for s in self.starts()]

    def is_single_document(self) -> bool:
        """True when every row holds one document (nothing packed)."""
        return bool((self.ids[:, 0] == self.ids[:, -1]).all())

    def chunks(self, chunk_tokens: int) -> list[tuple[int | None, list[tuple[int, int, bool]]]]:
        """SDPA work plan: ``[(row, [(start, stop, single_document), ...]), ...]`` cutting each
        row at document boundaries into runs of at most ``chunk_tokens`` tokens (longer documents
        alone). ``row`` is None when all batch rows share the boundaries (one call for the batch)."""

        def plan(starts):
            out, lo, n_docs = [], starts[0], 0
            for a, b in zip(starts[:-1], starts[1:]):
                if n_docs and b - lo > chunk_tokens:
                    out.append((lo, a, n_docs == 1))
                    lo, n_docs = a, 0
                n_docs += 1
            out.append((lo, starts[-1], n_docs == 1))
            return out

        def build():
            starts = self.starts()
            if all(s == starts[0] for s in starts):
                return [(None, plan(starts[0]))]
            return [(row, plan(s)) for row, s in enumerate(starts)]

        return self._cached(("chunks", chunk_tokens), build)

    # -- masks -----------------------------------------------------------------------------------

    def dense_mask(self, is_causal: bool, rows: slice = slice(None), span: tuple[int, int] | None = None) -> Tensor:
        """Bool ``(B_ids, 1, L, L)``: True where query and key share a document (and, causal, key
        ≤ query), for tokens ``span`` (default all) of the id rows ``rows``."""

        def build():
            ids = self.ids[rows] if span is None else self.ids[rows, span[0] : span[1]]
            mask = ids[:, :, None] == ids[:, None, :]
            if is_causal:
                n = ids.shape[1]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
            return mask.unsqueeze(1)

        return self._cached(("dense", is_causal, rows.start, rows.stop, span), build)

    def mask_mod(self, is_causal: bool):
        """flex ``mask_mod``: same document (and causal). Compose with ``and_masks`` for your own."""
        ids, shared = self.ids, self.batch == 1

        def document_mask(b, h, q_idx, kv_idx):
            row = 0 if shared else b
            same = ids[row, q_idx] == ids[row, kv_idx]
            return same & (q_idx >= kv_idx) if is_causal else same

        return document_mask

    def block_mask(self, is_causal: bool, block_size: int = 128):
        """flex BlockMask ``(B_ids, 1, N, N)`` of the documents, its block structure computed from
        the first and last document id of every block (documents are contiguous, so two blocks
        share a document iff their id ranges touch)."""
        from torch.nn.attention.flex_attention import BlockMask

        def build():
            ids, n = self.ids, self.seq_len
            nb = -(-n // block_size)
            first = ids[:, ::block_size]  # (B, nb): id of each block's first token
            last = ids[:, torch.arange(1, nb + 1, device=ids.device).mul(block_size).clamp(max=n) - 1]
            q_lo, q_hi = first[:, :, None], last[:, :, None]
            k_lo, k_hi = first[:, None, :], last[:, None, :]
            touch = (q_lo <= k_hi) & (k_lo <= q_hi)
            one_doc = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
            i = torch.arange(nb, device=ids.device)
            tail = torch.zeros(nb, dtype=torch.bool, device=ids.device)
            tail[-1] = n % block_size != 0  # padded block: never full
            full = one_doc & ~tail[:, None] & ~tail[None, :]
            if is_causal:
                touch = touch & (i[None, :, None] >= i[None, None, :])
                full = full & (i[None, :, None] > i[None, None, :])
            partial = touch & ~full
            return BlockMask.from_kv_blocks(
                *_ordered(partial.unsqueeze(1)), *_ordered(full.unsqueeze(1)),
                BLOCK_SIZE=block_size, mask_mod=self.mask_mod(is_causal), seq_lengths=(n, n),
            )

        return self._cached(("block", is_causal, block_size), build)

    def cu_seqlens(self, batch: int) -> tuple[Tensor, int]:
        """``(cu_seqlens int32, max_seqlen)`` over ``batch`` rows of N tokens flattened, for
        ``flash_attn_varlen_func``."""

        def build():
            starts = self.starts()
            if len(starts) == 1:
                starts = starts * batch
            cu, max_len = [], 0
            for row, s in enumerate(starts):
                cu.extend(row * self.seq_len + p for p in s[:-1])
                max_len = max([max_len] + [b - a for a, b in zip(s[:-1], s[1:])])
            cu.append(batch * self.seq_len)
            return torch.tensor(cu, dtype=torch.int32, device=self.ids.device), max_len

        return self._cached(("cu", batch), build)


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(count, indices) per query block of the set kv blocks, set ones first (BlockMask layout)."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order


def as_documents(documents) -> Documents | None:
    """``None``, a :class:`Documents`, or a tensor of document ids (validated)."""
    if documents is None or isinstance(documents, Documents):
        return documents
    if isinstance(documents, Tensor):
        return Documents(documents)
    raise TypeError(f"documents must be a Documents or a tensor of document ids, got {type(documents).__name__}")


def with_documents(documents: Documents, attn_mask, is_causal: bool, rows: slice = slice(None)) -> Tensor:
    """The dense document mask (causal if asked) intersected with a tensor ``attn_mask``: bool
    masks are and-ed, additive ones get -inf outside the documents."""
    mask = documents.dense_mask(is_causal, rows)
    if attn_mask is None:
        return mask
    if isinstance(attn_mask, CausalMask):
        attn_mask = attn_mask.dense(mask.device)
    if attn_mask.dtype == torch.bool:
        return attn_mask & mask
    return attn_mask.masked_fill(~mask, float("-inf"))
