"""Hugging Face transformers: "sdpa" attention as Ulysses, with masks of the global sequence.

On the propagation path (eager, the default) HF's own SDPA attention and mask builders run on
``Shard(seq)`` DTensors and see the global sequence: causal, sliding-window, padding and packed
masks come out as in one process, and ``F.scaled_dot_product_attention`` is routed to Ulysses
attention. Nothing of HF is replaced there.

The local-tensor path (under torch.compile, or ``UlyssesConfig(propagation=False)``) runs the
model on N/P tokens, where HF would build masks of this rank's block only. So a parallelized HF
model is switched to the attention implementation "ulysses_sdpa": HF's SDPA attention function
with a mask function that builds the global causal mask (``None``: plain ``is_causal``), and
refuses what it cannot build (sliding windows shorter than N, padding). Propagated forwards set
the implementation back to "sdpa" for their duration (``native_sdpa``), since some models branch
on that literal name (Falcon).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from .rewrite import active_mode

IMPLEMENTATION = "ulysses_sdpa"

# config attributes holding a mixture-of-experts' expert count
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "_attn_implementation")


def expert_count(model: nn.Module) -> int | None:
    """The number of experts of a mixture-of-experts config, or None."""
    value = next((getattr(model.config, n) for n in EXPERT_COUNTS if getattr(model.config, n, None)), None)
    return value if isinstance(value, int) and value > 1 else None


def _ulysses_sdpa_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, device="cpu", **kwargs):
    """HF's SDPA mask inside a parallelized forward. Propagation path: HF's own ``sdpa_mask``
    (its shapes are global already). Local path: the global causal mask — None (SDPA's
    is_causal) when HF may skip it, else (B, 1, N, N); a window shorter than N is refused."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mode = active_mode()
    if mode.propagation.active:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, device=device, **kwargs)
    seq_len = mode.seq_len
    if q_offset or kv_offset or kv_length != q_length:
        raise ValueError("ulysses_sdpa masks are built inside a parallelized forward without a KV cache")
    window = kwargs.get("local_size")
    if window is not None and window < seq_len:
        raise ValueError(
            f"a sliding window of {window} < N = {seq_len} under torch.compile (the local-tensor path, "
            "which builds causal masks only): run the model eager, where HF builds its own masks"
        )
    return sdpa_mask(
        batch_size=batch_size, q_length=seq_len, kv_length=seq_len, mask_function=causal_mask_function,
        allow_is_causal_skip=True, device=device,
    )


def use_ulysses_attention(model: nn.Module, refuse_windows: bool) -> None:
    """Check the attention implementation ('sdpa' only) and switch it to "ulysses_sdpa".
    ``refuse_windows``: refuse sliding-window layers now (``propagation=False``: the local path
    only ever runs, and builds causal masks only)."""
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
    if refuse_windows and (window is not None or layer_types - {"full_attention"}):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or other non-causal attention layers "
            f"(sliding_window={window}, layer_types={sorted(layer_types)}); UlyssesConfig(propagation=False) "
            "supports full causal attention only: use the default propagation path"
        )
    AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _ulysses_sdpa_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = IMPLEMENTATION


@contextlib.contextmanager
def native_sdpa(model: nn.Module) -> Iterator[None]:
    """The model's configs say "sdpa" (not "ulysses_sdpa") for the duration: HF's own code runs
    unchanged on the propagation path."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == IMPLEMENTATION}
    for c in configs.values():
        c._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = IMPLEMENTATION
