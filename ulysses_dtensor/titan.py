"""torchtitan models: their inner attention modules run as Ulysses attention.

torchtitan's ``ScaledDotProductAttention`` module calls ``F.scaled_dot_product_attention`` and is
rewritten like any SDPA call. Its ``FlexAttention`` module calls a compiled ``flex_attention``,
which no function mode sees, so each such module's ``forward`` is replaced by one that runs
:func:`ulysses_attention` with the flex kernel and the caller's BlockMask — built, as torchtitan
does, from the *global* positions (``model.get_attention_masks(positions)``). ``VarlenAttention``
is refused. Layouts: torchtitan passes q/k/v as (B, L, H, D); Ulysses takes (B, H, L, D).
"""

from __future__ import annotations

import torch.nn as nn

from .rewrite import active_mode


def _module_is(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("torchtitan.")


def is_titan_model(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a torchtitan class."""
    return any(type(m).__module__.startswith("torchtitan.") for m in model.modules())


def use_ulysses_attention(model: nn.Module) -> None:
    """Replace the forward of every torchtitan FlexAttention module; refuse VarlenAttention."""
    for name, module in model.named_modules():
        if _module_is(module, "VarlenAttention"):
            raise ValueError(
                f"{name}: torchtitan VarlenAttention is not supported by sequence parallelism yet; "
                "build the model with flex (attn_backend='flex') or SDPA inner attention"
            )
        if _module_is(module, "FlexAttention"):
            module.forward = _ulysses_flex_forward


def _ulysses_flex_forward(q_BLNH, k_BLNH, v_BLNH, *, attention_masks, score_mod=None, scale=None,
                          enable_gqa=False, out_transform=None, **kwargs):
    """torchtitan FlexAttention.forward, Ulysses style. (B, L_r, H, D) in and out."""
    if score_mod is not None or out_transform is not None:
        raise ValueError("Ulysses flex attention supports block masks, not score_mod / out_transform")
    mode = active_mode()

    def local_flex(q, k, v, attn_mask=None, **options):  # local_attention_only: this rank's block only
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = q.shape[2]
        causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=q.device.type)
        return flex_attention(q, k, v, block_mask=causal, **options)

    out = mode.attend(
        q_BLNH.transpose(1, 2), k_BLNH.transpose(1, 2), v_BLNH.transpose(1, 2), local_flex, kernel="flex",
        uses_documents=False, attn_mask=attention_masks, scale=scale, enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)
