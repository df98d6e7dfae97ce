"""Local attention kernels run between the two all-to-alls.

Every kernel sees full-sequence, head-sharded tensors: q: (B, H_r, N, D), k/v: (B, H_kv_r, N, D)
with ``enable_gqa`` meaning query head ``j`` reads kv head ``j // (H_r // H_kv_r)``. So a kernel
is exactly its single-process self: masks and causality are expressed for the global sequence.

Packed documents (``documents.Documents`` of the global sequence) go to a kernel's document
variant (:data:`DOCUMENT_KERNELS`): SDPA per chunk of whole documents, flex with a document
BlockMask, flash-attn's varlen function. A callable kernel gets the dense document mask as
``attn_mask``.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .masks import CausalMask, sdpa_causal_mask

Tensor = torch.Tensor


class LocalAttention(Protocol):
    """Signature of a local kernel: ``(q, k, v, *, attn_mask, is_causal, scale, enable_gqa,
    dropout_p) -> (B, H_r, N, Dv)``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: object,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        dropout_p: float,
    ) -> Tensor: ...


def sdpa_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """``F.scaled_dot_product_attention``; any backend torch picks (flash/efficient/cudnn/math).
    A :class:`~ulysses_dtensor.masks.CausalMask` is computed from its structure (no (N, N) mask)."""
    if isinstance(attn_mask, CausalMask):
        return sdpa_causal_mask(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


def check_sdpa(attn_mask, dropout_p: float) -> None:
    if attn_mask is not None and not isinstance(attn_mask, (Tensor, CausalMask)):
        raise TypeError(f"kernel='sdpa' takes attn_mask as a Tensor, got {type(attn_mask).__name__}")


def flex_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """``flex_attention``; ``attn_mask`` is a BlockMask built for the global sequence (N, N).

    ``is_causal`` builds a causal BlockMask. Torch's flex attention has no backward on CPU.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if isinstance(attn_mask, CausalMask):
        n = attn_mask.seq_len
        batch = attn_mask.batch if attn_mask.key_padding is not None else None
        attn_mask = create_block_mask(attn_mask.mask_mod(), batch, None, n, n, device=q.device.type)
    if is_causal:
        n_q, n_kv = q.shape[2], k.shape[2]
        attn_mask = create_block_mask(
            lambda b, h, qi, ki: qi >= ki, None, None, n_q, n_kv, device=q.device.type
        )
    return flex_attention(q, k, v, block_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)


def check_flex(attn_mask, dropout_p: float) -> None:
    from torch.nn.attention.flex_attention import BlockMask

    if dropout_p:
        raise ValueError("kernel='flex' does not support dropout_p; use kernel='sdpa'")
    if attn_mask is not None and not isinstance(attn_mask, (BlockMask, CausalMask)):
        raise TypeError(
            f"kernel='flex' takes attn_mask as a flex_attention BlockMask of the global sequence, "
            f"got {type(attn_mask).__name__}; use kernel='sdpa' for tensor masks"
        )


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package (CUDA only) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """flash-attn 2 ``flash_attn_func`` (CUDA, fp16/bf16). No tensor masks: causal or none, or a
    :class:`~ulysses_dtensor.masks.CausalMask` without padding (its window as ``window_size``)."""
    from flash_attn import flash_attn_func

    window = (-1, -1)
    if isinstance(attn_mask, CausalMask):
        is_causal = True
        if attn_mask.window is not None:
            window = (attn_mask.window - 1, 0)
    # flash-attn takes (B, N, H, D) and does GQA natively when H is a multiple of H_kv.
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal, window_size=window,
    )
    return out.transpose(1, 2)


def check_flash(attn_mask, dropout_p: float) -> None:
    if not flash_attn_available():
        raise RuntimeError(
            "kernel='flash' needs the flash-attn package (CUDA): pip install 'ulysses_dtensor[flash]'"
        )
    if isinstance(attn_mask, CausalMask) and attn_mask.key_padding is None:
        return
    if attn_mask is not None:
        raise ValueError(
            "kernel='flash' supports is_causal and sliding windows but no attn_mask or padding; use kernel='sdpa'"
        )


def _no_check(attn_mask, dropout_p: float) -> None:
    pass


# -- packed documents ------------------------------------------------------------------------------


def sdpa_documents_kernel(q, k, v, *, documents, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """SDPA within documents. Eagerly, per chunk of whole documents (``Documents.chunks``): one
    document → plain SDPA (``is_causal``, no mask); several → the chunk's block-diagonal mask.
    With a tensor ``attn_mask``, ``chunk_tokens=None`` or under torch.compile: one dense
    ``(B, 1, N, N)`` document mask."""
    from .documents import with_documents

    sdpa = partial(F.scaled_dot_product_attention, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None or documents.chunk_tokens is None or torch.compiler.is_compiling():
        return sdpa(q, k, v, attn_mask=with_documents(documents, attn_mask, is_causal))
    rows_out = []
    for row, chunks in documents.chunks(documents.chunk_tokens):
        batch = slice(None) if row is None else slice(row, row + 1)
        id_rows = slice(None) if row is None else batch
        out = []
        for start, stop, single in chunks:
            span = (batch, slice(None), slice(start, stop))
            if single:
                out.append(sdpa(q[span], k[span], v[span], is_causal=is_causal))
            else:
                mask = documents.dense_mask(is_causal, id_rows, (start, stop))
                out.append(sdpa(q[span], k[span], v[span], attn_mask=mask))
        rows_out.append(out[0] if len(out) == 1 else torch.cat(out, dim=2))
    return rows_out[0] if len(rows_out) == 1 else torch.cat(rows_out, dim=0)


def flex_documents_kernel(q, k, v, *, documents, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """flex_attention with the documents' BlockMask (causal within documents if asked)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = documents.block_mask(is_causal)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def check_flex_documents(attn_mask, dropout_p: float) -> None:
    check_flex(attn_mask, dropout_p)
    if attn_mask is not None:
        raise ValueError(
            "kernel='flex' with documents takes no attn_mask: build one BlockMask from "
            "and_masks(your_mask_mod, documents.mask_mod(is_causal)) and pass it without documents"
        )


def flash_varlen_kernel(q, k, v, *, documents, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """flash-attn 2 ``flash_attn_varlen_func`` over the documents (CUDA, fp16/bf16): batch rows
    flattened to one token axis, documents given by ``cu_seqlens``; GQA native."""
    from flash_attn import flash_attn_varlen_func

    batch, _, n, _ = q.shape
    cu_seqlens, max_seqlen = documents.cu_seqlens(batch)

    def tokens(t):  # (B, H, N, D) -> (B*N, H, D)
        return t.transpose(1, 2).reshape(batch * n, t.shape[1], t.shape[3])

    out = flash_attn_varlen_func(
        tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
    )
    return out.view(batch, n, q.shape[1], -1).transpose(1, 2)


def with_document_mask(kernel: Callable) -> Callable:
    """A callable kernel given documents: it sees the dense document mask as ``attn_mask``."""

    def run(q, k, v, *, documents, attn_mask, is_causal, scale, enable_gqa, dropout_p):
        from .documents import with_documents

        return kernel(
            q, k, v, attn_mask=with_documents(documents, attn_mask, is_causal), is_causal=False,
            scale=scale, enable_gqa=enable_gqa, dropout_p=dropout_p,
        )

    return run


def with_dense_mask(kernel: Callable) -> Callable:
    """A callable kernel sees a :class:`~ulysses_dtensor.masks.CausalMask` as its dense mask."""

    def run(q, k, v, *, attn_mask, **options):
        if isinstance(attn_mask, CausalMask):
            attn_mask = attn_mask.dense(q.device)
        return kernel(q, k, v, attn_mask=attn_mask, **options)

    return run


# name -> (kernel, input check run before any collective)
KERNELS: dict[str, tuple[Callable, Callable]] = {
    "sdpa": (sdpa_kernel, check_sdpa),
    "flex": (flex_kernel, check_flex),
    "flash": (flash_kernel, check_flash),
}


# name -> (document kernel: the kernel's signature plus ``documents``, input check)
DOCUMENT_KERNELS: dict[str, tuple[Callable, Callable]] = {
    "sdpa": (sdpa_documents_kernel, check_sdpa),
    "flex": (flex_documents_kernel, check_flex_documents),
    "flash": (flash_varlen_kernel, check_flash),
}


def resolve_kernel(kernel: str | Callable, documents: bool = False) -> tuple[Callable, Callable]:
    """``(kernel, check)`` for a kernel name (``"sdpa"``, ``"flex"``, ``"flash"``) or a callable
    with the :class:`LocalAttention` signature (which gets no check). ``documents``: the variant
    for packed documents (it takes a ``documents`` keyword too)."""
    if callable(kernel):
        return (with_document_mask(kernel) if documents else with_dense_mask(kernel)), _no_check
    try:
        return (DOCUMENT_KERNELS if documents else KERNELS)[kernel]
    except (KeyError, TypeError):
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {sorted(KERNELS)} or pass a callable") from None
