"""Ulysses attention: q/k/v sequence->head all-to-all, any local kernel, output head->sequence.

Per forward exactly two collectives (q, k, v fused; output) and per backward exactly two
(grad of the output in; dq, dk, dv fused out). Every input check runs before the first
collective, so bad input raises the same error on every rank instead of hanging the group.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .comm import check_4d, exchange_head_to_seq, exchange_seq_to_head, group_rank_world, resolve_seq_len
from .documents import Documents, as_documents
from .head_chunks import check_head_chunks, head_chunked_attention
from .kernels import resolve_kernel
from .layout import UlyssesLayout
from .masks import CausalMask

Tensor = torch.Tensor


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    attn_mask: Tensor | object | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    kernel: str | Callable = "sdpa",
    seq_len: int | None = None,
    documents: Documents | Tensor | None = None,
    head_chunks: int = 1,
) -> Tensor:
    """Exact attention over the global sequence from sequence-sharded inputs.

    Args:
        q: (B, H, N_r, D), this rank's tokens (DTensor ``Shard(2)`` layout).
        k, v: (B, H_kv, N_r, D) and (B, H_kv, N_r, Dv); ``H % H_kv == 0``. ``H_kv < H`` needs
            ``enable_gqa=True`` (as in SDPA); each rank then receives exactly the kv heads its
            query heads read, so ``H_kv < P`` moves no replicated kv head.
        group: the sequence-parallel process group (default: world).
        attn_mask: mask of the *global* sequence, broadcastable to (B, H, N, N): bool (True =
            attend) or additive in q's dtype. With ``kernel="flex"``, a BlockMask of (N, N). Or a
            :class:`~ulysses_dtensor.masks.CausalMask` (causal, sliding window, key padding as
            structure: never an (N, N) tensor with the SDPA kernel).
        dropout_p, is_causal, scale, enable_gqa: as in ``F.scaled_dot_product_attention``.
        kernel: "sdpa" (default), "flex", "flash" or a callable (see ``kernels.LocalAttention``).
        seq_len: global N; default ``N_r * P``. Shards follow DTensor's ``Shard`` rule, so for
            N % P != 0 ranks hold ceil(N/P) tokens and the last ones fewer.
        documents: packed documents of the *global* sequence: attention stays within each
            document (causal within it with ``is_causal``; intersected with a tensor
            ``attn_mask``). A :class:`~ulysses_dtensor.documents.Documents` (build it once per step
            and pass it to every layer: its masks are cached) or a tensor of document ids ``(B, N)``
            / ``(N,)``, non-decreasing along the sequence, the same on every rank. The mask is built
            locally after the all-to-all (every rank then holds all N tokens): no extra collective.
            See docs/packed.md for the kernels' document paths and their memory.
        head_chunks: process each rank's query heads in this many chunks (``head_chunks.py``):
            full-sequence q and output exist for ~1/head_chunks of the heads at a time and the
            head layout is not saved for backward (which receives q, k, v again and recomputes
            the kernel). 1 (default): plain Ulysses.

    Returns:
        (B, H, N_r, Dv): this rank's tokens of the attention output.
    """
    group, rank, world = group_rank_world(group)
    documents = as_documents(documents)
    layout = check_attention_inputs(
        q, k, v, world=world, rank=rank, attn_mask=attn_mask, is_causal=is_causal,
        enable_gqa=enable_gqa, seq_len=seq_len, documents=documents,
    )
    local_kernel, check_kernel_inputs = resolve_kernel(kernel, documents=documents is not None)
    check_kernel_inputs(attn_mask, dropout_p)
    check_head_chunks(head_chunks, dropout_p)
    if head_chunks > 1 and world > 1:
        def attend(q_h, k_h, v_h, chunk_layout):
            return local_attention(
                q_h, k_h, v_h, chunk_layout, rank, local_kernel, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, documents=documents,
            )

        return head_chunked_attention(q, k, v, layout, rank, group, head_chunks, attend)
    q_h, k_h, v_h = exchange_seq_to_head(layout.qkv_plan(rank, group), q, k, v)
    out_h = local_attention(
        q_h, k_h, v_h, layout, rank, local_kernel,
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, documents=documents,
    )
    return exchange_head_to_seq(layout.out_plan(rank, group), out_h)[0]


def local_attention(
    q_h: Tensor,
    k_h: Tensor,
    v_h: Tensor,
    layout: UlyssesLayout,
    rank: int,
    kernel: Callable,
    *,
    attn_mask,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    documents: Documents | None = None,
) -> Tensor:
    """Run ``kernel`` on this rank's heads over the full sequence.

    q_h: (B, H_r, N, D), k_h/v_h: (B, H_kv_r, N, D). Returns (B, H_r, N, Dv). With ``documents``
    the kernel is a document kernel (``kernels.DOCUMENT_KERNELS``) and gets them as a keyword.
    """
    q_start, q_stop = layout.q_ranges[rank]
    if q_stop == q_start:
        # No head here (H < P). The empty output stays in the autograd graph so this rank
        # still joins the backward all-to-alls the other ranks issue.
        return v_h[:, :0]
    k_h, v_h, enable_gqa = _match_kv_heads(q_h, k_h, v_h, layout, rank)
    if isinstance(attn_mask, Tensor):
        attn_mask = _mask_for_heads(attn_mask, layout.num_heads, q_start, q_stop)
    elif attn_mask is not None and hasattr(attn_mask, "shape") and attn_mask.shape[1] == layout.num_heads > 1:
        attn_mask = attn_mask[:, q_start:q_stop]  # per-head flex BlockMask
    if documents is not None:
        return kernel(
            q_h, k_h, v_h, documents=documents, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, dropout_p=dropout_p,
        )
    return kernel(
        q_h, k_h, v_h, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, dropout_p=dropout_p,
    )


def _match_kv_heads(q_h: Tensor, k_h: Tensor, v_h: Tensor, layout: UlyssesLayout, rank: int):
    """The kv heads the local kernel gets for this rank's query heads, and its ``enable_gqa``.

    q_h: (B, H_r, N, D); k_h, v_h: (B, H_kv_r, N, D), the received kv heads. Returns them as
    they are (native GQA when H_r != H_kv_r) when the grouping is uniform, else expanded to
    (B, H_r, N, D) by ``layout.kv_expansion_index`` (local memory only; nothing extra crosses
    the wire) and ``enable_gqa=False``."""
    index = layout.kv_expansion_index(rank)
    if index is None:
        return k_h, v_h, q_h.shape[1] != k_h.shape[1]
    index = torch.tensor(index, device=k_h.device)
    return k_h.index_select(1, index), v_h.index_select(1, index), False


def _mask_for_heads(mask: Tensor, num_heads: int, start: int, stop: int) -> Tensor:
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[1] == num_heads and num_heads > 1:
        mask = mask[:, start:stop]
    return mask


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    world: int,
    rank: int,
    attn_mask=None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    seq_len: int | None = None,
    documents: Documents | None = None,
) -> UlyssesLayout:
    """Validate local shards and return the exchange layout. Raises before any collective."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_4d(t, name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, num_heads, n_local, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != n_local or v.shape[2] != n_local:
        raise ValueError(
            f"local sequence lengths differ: q {n_local}, k {k.shape[2]}, v {v.shape[2]}; Ulysses "
            "needs q, k and v sharded identically along the sequence"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} vs {k.shape[3]}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}: "
            "grouped-query attention needs H % H_kv == 0"
        )
    if num_kv_heads != num_heads and not enable_gqa:
        raise ValueError(
            f"q has {num_heads} heads and k/v have {num_kv_heads}: pass enable_gqa=True for "
            "grouped-query attention"
        )
    seq_len = resolve_seq_len(n_local, seq_len, rank, world)
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        _check_mask(attn_mask, q, batch, num_heads, seq_len)
    if documents is not None:
        documents.check(batch, seq_len, q.device)
    return UlyssesLayout.build(batch, num_heads, num_kv_heads, seq_len, head_dim, world, v.shape[3])


def _check_mask(mask, q: Tensor, batch: int, num_heads: int, seq_len: int) -> None:
    if isinstance(mask, CausalMask):
        if mask.seq_len != seq_len or mask.batch not in (1, batch):
            raise ValueError(
                f"CausalMask of batch {mask.batch} and N = {mask.seq_len} does not fit (B, N) = ({batch}, {seq_len})"
            )
        return
    if not isinstance(mask, Tensor):
        shape = getattr(mask, "shape", None)  # flex BlockMask
        if shape is None:
            raise TypeError(f"attn_mask must be a Tensor or a flex BlockMask, got {type(mask).__name__}")
        if tuple(shape[-2:]) != (seq_len, seq_len):
            raise ValueError(
                f"BlockMask covers {tuple(shape[-2:])} but the global sequence is {seq_len}: "
                "build it for the global (N, N), not the local shard"
            )
        return
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise TypeError(f"attn_mask must be bool or {q.dtype} (q's dtype), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {q.device}")
    if not 2 <= mask.dim() <= 4:
        raise ValueError(f"attn_mask must be 2-D to 4-D, broadcastable to (B, H, N, N); got {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) != (seq_len, seq_len):
        raise ValueError(
            f"attn_mask's last two dims are {tuple(mask.shape[-2:])} but must be the global "
            f"(N, N) = ({seq_len}, {seq_len}): Ulysses attends every query to every key after the "
            "all-to-all, so pass the mask of the whole sequence, not this rank's rows"
        )
    full = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if full[0] not in (1, batch) or full[1] not in (1, num_heads):
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, H, N, N) = "
            f"({batch}, {num_heads}, {seq_len}, {seq_len})"
        )
