"""Local attention kernels run between the two all-to-alls.

Every kernel sees full-sequence, head-sharded tensors: q: (B, H_r, N, D), k/v: (B, H_kv_r, N, D)
with ``enable_gqa`` meaning query head ``j`` reads kv head ``j // (H_r // H_kv_r)``. So a kernel
is exactly its single-process self: masks and causality are expressed for the global sequence.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

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
    """``F.scaled_dot_product_attention``; any backend torch picks (flash/efficient/cudnn/math)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


def check_sdpa(attn_mask, dropout_p: float) -> None:
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"kernel='sdpa' takes attn_mask as a Tensor, got {type(attn_mask).__name__}")


def flex_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """``flex_attention``; ``attn_mask`` is a BlockMask built for the global sequence (N, N).

    ``is_causal`` builds a causal BlockMask. Torch's flex attention has no backward on CPU.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

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
    if attn_mask is not None and not isinstance(attn_mask, BlockMask):
        raise TypeError(
            f"kernel='flex' takes attn_mask as a flex_attention BlockMask of the global sequence, "
            f"got {type(attn_mask).__name__}; use kernel='sdpa' for tensor masks"
        )


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package (CUDA only) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    """flash-attn 2 ``flash_attn_func`` (CUDA, fp16/bf16). No tensor masks: causal or none."""
    from flash_attn import flash_attn_func

    # flash-attn takes (B, N, H, D) and does GQA natively when H is a multiple of H_kv.
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
    )
    return out.transpose(1, 2)


def check_flash(attn_mask, dropout_p: float) -> None:
    if not flash_attn_available():
        raise RuntimeError(
            "kernel='flash' needs the flash-attn package (CUDA): pip install 'ulysses_dtensor[flash]'"
        )
    if attn_mask is not None:
        raise ValueError("kernel='flash' supports is_causal but no attn_mask; use kernel='sdpa'")


def _no_check(attn_mask, dropout_p: float) -> None:
    pass


# name -> (kernel, input check run before any collective)
KERNELS: dict[str, tuple[Callable, Callable]] = {
    "sdpa": (sdpa_kernel, check_sdpa),
    "flex": (flex_kernel, check_flex),
    "flash": (flash_kernel, check_flash),
}


def resolve_kernel(kernel: str | Callable) -> tuple[Callable, Callable]:
    """``(kernel, check)`` for a kernel name (``"sdpa"``, ``"flex"``, ``"flash"``) or a callable
    with the :class:`LocalAttention` signature (which gets no check)."""
    if callable(kernel):
        return kernel, _no_check
    try:
        return KERNELS[kernel]
    except (KeyError, TypeError):
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {sorted(KERNELS)} or pass a callable") from None
