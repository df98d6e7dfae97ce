"""Plain models calling ``flex_attention`` directly.

``flex_attention`` is a Python function no function mode sees, and models bind it by name
(``from torch.nn.attention.flex_attention import flex_attention``). So parallelize_module rebinds
that name, in the modules defining the model's classes, to :func:`ulysses_flex_attention`: inside
a parallelized forward it runs Ulysses attention with the flex kernel; anywhere else it is the
original function, unchanged.

A model usually builds its BlockMask from its own sequence length, which under sequence
parallelism is the local one. Such a mask is rebuilt for the global sequence from its
``mask_mod``, which must therefore depend on token indices only (causal, sliding window, ...);
a mask_mod reading a tensor of the local length fails with an index error, never silently.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.attention import flex_attention as flex_module

from .namespaces import model_namespaces
from .rewrite import running_mode

_original_flex_attention = flex_module.flex_attention


def global_block_mask(block_mask, seq_len: int, device):
    """``block_mask`` for the global (seq_len, seq_len), rebuilt from its mask_mod if needed."""
    if block_mask is None or tuple(block_mask.shape[-2:]) == (seq_len, seq_len):
        return block_mask
    batch, heads = block_mask.shape[0], block_mask.shape[1]
    return flex_module.create_block_mask(
        block_mask.mask_mod, batch if batch > 1 else None, heads if heads > 1 else None, seq_len, seq_len,
        device=device, BLOCK_SIZE=block_mask.BLOCK_SIZE,
    )


def ulysses_flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                           return_lse=False, kernel_options=None, **kwargs):
    """``flex_attention`` that is Ulysses attention inside a parallelized forward."""
    mode = running_mode()
    if mode is None:
        return _original_flex_attention(
            query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
            enable_gqa=enable_gqa, return_lse=return_lse, kernel_options=kernel_options, **kwargs,
        )
    if score_mod is not None or return_lse or kwargs.get("return_aux") is not None:
        raise ValueError("sequence-parallel flex_attention supports block masks, not score_mod or returned lse")

    def local_flex(q, k, v, attn_mask=None, **options):  # local_attention_only: the call as written
        return _original_flex_attention(q, k, v, block_mask=block_mask, **options)

    return mode.attend(
        query, key, value, local_flex, kernel="flex", uses_documents=False,
        attn_mask=global_block_mask(block_mask, mode.seq_len, query.device.type), scale=scale, enable_gqa=enable_gqa,
    )


def use_ulysses_attention(model: nn.Module) -> None:
    """Rebind ``flex_attention`` in the modules that define the model's classes (for good:
    compiled forwards read it too; outside a parallelized forward it is the original)."""
    for namespace in model_namespaces(model):
        for name, value in list(vars(namespace).items()):
            if value is _original_flex_attention:
                setattr(namespace, name, ulysses_flex_attention)
