"""Hugging Face transformers: run "sdpa" attention as Ulysses with masks of the global sequence.

HF builds attention masks from this rank's positions, which would describe only its own
N/P × N/P block. So a parallelized HF model switches to the attention implementation
"ulysses_sdpa": HF's own SDPA attention function (whose ``F.scaled_dot_product_attention`` call
the rewrite mode turns into Ulysses attention) with a mask function that builds HF's SDPA mask
for the *global* sequence — ``None`` (plain ``is_causal``) when it can, the exact global mask
(sliding windows, packed positions, ...) otherwise.
"""

from __future__ import annotations

import torch.nn as nn

from .rewrite import active_mode

IMPLEMENTATION = "ulysses_sdpa"

def is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "_attn_implementation")


def _global_causal_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, device="cpu", **kwargs):
    """HF's SDPA causal mask of the global sequence: None (SDPA's is_causal) when HF may skip it,
    else the (B, 1, N, N) mask. Sliding-window and packed-document masks are refused upstream."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    seq_len = active_mode().seq_len
    if q_offset or kv_offset or kv_length != q_length:
        raise ValueError("ulysses_sdpa masks are built inside a parallelized forward without a KV cache")
    return sdpa_mask(
        batch_size=batch_size, q_length=seq_len, kv_length=seq_len, mask_function=causal_mask_function,
        allow_is_causal_skip=True, device=device,
    )


def use_ulysses_attention(model: nn.Module) -> None:
    """Check the model's attention implementation and switch it to "ulysses_sdpa"."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    impl = model.config._attn_implementation
    if impl not in ("sdpa", IMPLEMENTATION):
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; sequence parallelism needs 'sdpa' "
            "(eager attention computes softmax(QK^T) on this rank's tokens only). Load or build the model "
            "with attn_implementation='sdpa'"
        )
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None or layer_types - {"full_attention"}:
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or other non-causal attention layers "
            f"(sliding_window={window}, layer_types={sorted(layer_types)}); parallelize_module supports "
            "full causal attention for now"
        )
    AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _global_causal_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = IMPLEMENTATION
