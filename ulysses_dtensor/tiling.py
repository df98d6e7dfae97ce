"""Tiled MLP: a token-wise sublayer computed in sequence tiles, recomputed tile by tile in backward.

A transformer MLP maps each token on its own, but autograd keeps its whole (B, N/P, ffn)
intermediate (the gate and up projections, the activation, their product: ~4·ffn values per
token, 3.5× the model width each for Llama) from forward to backward. :func:`tiled_forward`
runs the MLP on tiles of ``tile_tokens`` tokens without recording a graph and keeps only its
input; backward recomputes each tile with autograd, takes that tile's gradients and drops it.
So at most one tile's intermediate ever exists, in forward and in backward, for one extra MLP
forward of compute. The parameters' gradients are summed over the tiles and returned through
the function's inputs (so FSDP2's unsharded parameters receive them as from any other op).

``UlyssesConfig(tiled_mlp=True)`` applies it to every block's MLP (:func:`tile_mlps`). Only
modules that are token-wise by construction are accepted: their leaves are ``nn.Linear``,
activations and ``Identity``; dropout would draw other masks in the recompute and is refused.
On the propagation path the MLP runs on this rank's local tokens (``tokenwise.run_on_local_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .tokenwise import is_moe_block, run_on_local_tokens

Tensor = torch.Tensor
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # Hugging Face, our llama / torchtitan, others


class _TiledTokenwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile_tokens: int, x: Tensor, *params: Tensor) -> Tensor:
        ctx.fn, ctx.tile_tokens = fn, tile_tokens
        ctx.save_for_backward(x, *params)
        return torch.cat([fn(x[:, s : s + tile_tokens]) for s in range(0, x.shape[1], tile_tokens)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *params = ctx.saved_tensors
        wanted = [p for p in params if p.requires_grad]
        dx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        dparams = [None] * len(wanted)
        for s in range(0, x.shape[1], ctx.tile_tokens):
            x_t = x[:, s : s + ctx.tile_tokens].detach().requires_grad_(dx is not None)
            with torch.enable_grad():
                out = ctx.fn(x_t)
                inputs = ([x_t] if dx is not None else []) + wanted
                grads = torch.autograd.grad(out, inputs, grad[:, s : s + ctx.tile_tokens], allow_unused=True)
            if dx is not None:
                dx[:, s : s + ctx.tile_tokens] = grads[0]
                grads = grads[1:]
            dparams = [g if a is None else (a if g is None else a + g) for a, g in zip(dparams, grads)]
        by_param = iter(dparams)
        return (None, None, dx, *(next(by_param) if p.requires_grad else None for p in params))


def tiled_forward(module: nn.Module, forward, x: Tensor, tile_tokens: int) -> Tensor:
    """``forward(x)`` of a token-wise ``module`` in tiles of ``tile_tokens`` along dim 1.

    x: (B, T, C) plain tensor. Returns what ``forward(x)`` returns (one tensor), exactly. Without
    grad mode (inference, or an offloaded block's forward) the tiles are just computed in turn."""
    if x.shape[1] <= tile_tokens:
        return forward(x)
    if not torch.is_grad_enabled():
        return torch.cat([forward(x[:, s : s + tile_tokens]) for s in range(0, x.shape[1], tile_tokens)], dim=1)
    return _TiledTokenwise.apply(forward, tile_tokens, x, *module.parameters())


def _is_tokenwise(module: nn.Module) -> bool:
    for leaf in (m for m in module.modules() if not list(m.children())):
        if isinstance(leaf, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
            if leaf.p > 0:
                return False
            continue
        if isinstance(leaf, (nn.Linear, nn.Identity)):
            continue
        kind = type(leaf).__module__
        if kind == "torch.nn.modules.activation" or kind.endswith("activations"):
            continue
        return False
    return True


def find_mlps(blocks: list[nn.Module]) -> list[nn.Module]:
    """The MLP child of each block (named one of :data:`MLP_NAMES`), token-wise by construction."""
    found = []
    for block in blocks:
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        for name in MLP_NAMES:
            child = getattr(inner, name, None)
            if isinstance(child, nn.Module):
                if is_moe_block(child):
                    break  # already run on local tokens, per expert (tokenwise.py)
                if not _is_tokenwise(child):
                    leaves = sorted({type(m).__name__ for m in child.modules() if not list(m.children())})
                    raise ValueError(
                        f"tiled_mlp: {type(inner).__name__}.{name} ({type(child).__name__}) is not token-wise by "
                        f"construction (its leaf modules: {', '.join(leaves)}; only Linear, activations, Identity "
                        "and dropout with p=0 are accepted): leave tiled_mlp=False for this model"
                    )
                found.append(child)
                break
    return found


def tile_mlps(blocks: list[nn.Module], tile_tokens: int | None = None) -> int:
    """Run each block's MLP in tiles (:func:`tiled_forward`); ``tile_tokens`` default: the
    model width (the intermediate of a tile is then ~ffn/C times the size of a hidden state of
    C tokens, as in DeepSpeed ALST's TiledMLP). Returns the number of MLPs tiled."""
    if tile_tokens is not None and tile_tokens < 1:
        raise ValueError(f"mlp_tile_tokens must be >= 1, got {tile_tokens}")
    mlps = find_mlps(blocks)
    if not mlps:
        raise ValueError(f"tiled_mlp: no block has an MLP child named one of {MLP_NAMES}")
    for mlp in mlps:
        original = mlp.forward

        def body(x, *args, _mlp=mlp, _original=original, **kwargs):
            if args or kwargs or not isinstance(x, Tensor) or x.dim() != 3:
                return _original(x, *args, **kwargs)
            return tiled_forward(_mlp, _original, x, tile_tokens or x.shape[-1])

        mlp.forward = body
        run_on_local_tokens(mlp)
    return len(mlps)
