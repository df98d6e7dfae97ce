"""torchtitan 0.3.0's Llama3 "debugmodel" on CPU, for test_titan.py and test_compile.py
(torchtitan is imported when a builder runs: import this module without it installed)."""

from __future__ import annotations

import dataclasses

import torch

TITAN_VOCAB = 2048  # the debugmodel's vocabulary


def use_eager_flex():
    """Reference and Ulysses runs both use eager flex_attention (no per-rank Inductor compile)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torchtitan.models.common.decoder as decoder
    from torchtitan.models.common.attention import FlexAttention

    FlexAttention._compiled_flex_attn = staticmethod(flex_attention)
    decoder.create_attention_mask = create_block_mask


def build_debugmodel(inner: str, max_seq_len: int = 256):
    """torchtitan's Llama3 "debugmodel" (dim 256, 16 heads, 6 layers), random init, on CPU.
    ``inner``: "flex" (torchtitan's default inner attention) or "sdpa"."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import llama3_configs

    cfg = llama3_configs["debugmodel"](attn_backend="flex")
    for layer in cfg.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=max_seq_len)
        if inner == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model
