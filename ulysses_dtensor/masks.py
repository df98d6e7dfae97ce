"""Causal masks kept as structure (sliding window, key padding): never an (N, N) tensor.

A sliding-window or padding mask built as a dense ``(B, 1, N, N)`` bool tensor outgrows a device
at the lengths sequence parallelism is for (N = 256K: 64 GiB per batch row, on every rank, since
after the all-to-all each rank attends all N tokens). :class:`CausalMask` describes the mask
instead — query ``q`` attends key ``k`` iff ``k <= q``, ``q - k < window`` (if a window is set)
and ``key_padding[b, k]`` (if set) — and the local kernels compute from the structure:

* a window: query tiles of ``tile`` rows, each against the keys its window reaches, so masks of
  ``tile × (tile + window)``;
* padding without a window: per batch row, the valid tokens form one run ``[s, e)`` (left or
  right padding): queries in the run attend causally within it (``is_causal``, no mask),
  queries after it attend the whole run (no mask), queries before it attend nothing (SDPA's
  zeros of a fully masked row).

Exact: every query meets the keys the dense mask gives it. Hugging Face's mask builders return
it on the propagation path (``hf.py``); other kernels than SDPA get a flex mask_mod or, for a
callable kernel, the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_TILE = 1024


@dataclass(frozen=True, eq=False)
class CausalMask:
    """Causal attention over a global sequence of ``seq_len`` tokens, narrowed by a sliding
    ``window`` (keys ``q - window < k <= q``) and ``key_padding`` ((B, N) bool, True = a real
    token). Passed as ``attn_mask`` to ``F.scaled_dot_product_attention`` inside a
    parallelized forward (it reaches Ulysses attention there, nowhere else)."""

    batch: int
    seq_len: int
    window: int | None = None
    key_padding: Tensor | None = None
    tile: int | None = None  # default: DEFAULT_TILE, read when the kernel runs

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"CausalMask window must be >= 1, got {self.window}")
        if self.key_padding is not None:
            if self.key_padding.dtype != torch.bool or tuple(self.key_padding.shape) != (self.batch, self.seq_len):
                raise ValueError(
                    f"CausalMask key_padding must be bool (B, N) = ({self.batch}, {self.seq_len}), got "
                    f"{self.key_padding.dtype} {tuple(self.key_padding.shape)}"
                )
        # one host read, shared by every layer the mask serves
        object.__setattr__(self, "_runs", None if self.key_padding is None else valid_runs(self.key_padding))
        if self.window is None and self.key_padding is not None and self._runs is None:
            raise ValueError("CausalMask without a window needs each row's real tokens to be one run (left or right padding)")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.seq_len, self.seq_len)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{func.__name__} got a CausalMask (attention structure of ulysses_dtensor) outside a "
            "parallelized forward; only its attention calls take one"
        )

    def valid_runs(self) -> list[tuple[int, int]] | None:
        """``[(s, e), ...]`` per batch row: its real tokens are ``[s, e)``; None if a row's are
        not one contiguous run (or there is no padding)."""
        return self._runs

    def rows(self, start: int, stop: int, key_start: int, key_stop: int, device) -> Tensor:
        """Bool ``(B or 1, 1, stop - start, key_stop - key_start)``: queries ``[start, stop)``
        against keys ``[key_start, key_stop)``."""
        q = torch.arange(start, stop, device=device)[:, None]
        k = torch.arange(key_start, key_stop, device=device)[None, :]
        mask = k <= q
        if self.window is not None:
            mask = mask & (q - k < self.window)
        mask = mask[None, None]
        if self.key_padding is not None:
            mask = mask & self.key_padding[:, None, None, key_start:key_stop].to(device)
        return mask

    def dense(self, device=None) -> Tensor:
        """The whole ``(B or 1, 1, N, N)`` mask (kernels that take no structure)."""
        device = device if device is not None else (self.key_padding.device if self.key_padding is not None else "cpu")
        return self.rows(0, self.seq_len, 0, self.seq_len, device)

    def mask_mod(self):
        """flex_attention ``mask_mod`` of the same mask."""
        window, padding = self.window, self.key_padding

        def causal_mask(b, h, q_idx, kv_idx):
            keep = kv_idx <= q_idx
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            if padding is not None:
                keep = keep & padding[b, kv_idx]
            return keep

        return causal_mask


def valid_runs(key_padding: Tensor) -> list[tuple[int, int]] | None:
    """``[(s, e), ...]``: row ``b`` of ``key_padding`` (B, N) is True exactly on ``[s, e)``;
    None if some row's True entries are not one run."""
    runs = []
    for row in key_padding.tolist():
        if not any(row):
            runs.append((0, 0))
            continue
        s = row.index(True)
        e = len(row) - row[::-1].index(True)
        if not all(row[s:e]):
            return None
        runs.append((s, e))
    return runs


def sdpa_causal_mask(q: Tensor, k: Tensor, v: Tensor, mask: CausalMask, *, scale, enable_gqa, dropout_p) -> Tensor:
    """``F.scaled_dot_product_attention`` of q: (B, H_r, N, D), k/v: (B, H_kv_r, N, D) under
    ``mask``, computed from its structure (module docstring). Returns (B, H_r, N, Dv)."""
    sdpa = lambda q_, k_, v_, **o: F.scaled_dot_product_attention(  # noqa: E731
        q_, k_, v_, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa, **o
    )
    n = q.shape[2]
    if mask.window is not None:
        out = []
        tile = mask.tile or DEFAULT_TILE
        for start in range(0, n, tile):
            stop = min(start + tile, n)
            lo = max(0, start - mask.window + 1)
            keys = (slice(None), slice(None), slice(lo, stop))
            out.append(sdpa(q[:, :, start:stop], k[keys], v[keys], attn_mask=mask.rows(start, stop, lo, stop, q.device)))
        return torch.cat(out, dim=2)
    if mask.key_padding is None:
        return sdpa(q, k, v, is_causal=True)
    rows = []
    for b, (s, e) in enumerate(mask.valid_runs()):
        row = slice(b, b + 1)
        before = s if e > s else n
        # queries before the run see no key: SDPA on one fully masked key gives its zeros (and
        # keeps them in the autograd graph)
        pieces = [sdpa(q[row, :, :before], k[row, :, :1], v[row, :, :1],
                       attn_mask=torch.zeros(1, 1, before, 1, dtype=torch.bool, device=q.device))] if before else []
        if e > s:
            run = (row, slice(None), slice(s, e))
            pieces.append(sdpa(q[run], k[run], v[run], is_causal=True))
            if e < n:
                pieces.append(sdpa(q[row, :, e:], k[run], v[run]))
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0)
