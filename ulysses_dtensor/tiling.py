"""Tiled token-wise sublayers (MLPs, norms): computed in sequence tiles, recomputed tile by tile in backward.

A transformer MLP maps each token on its own, but autograd keeps its whole (B, N/P, ffn)
intermediate (the gate and up projections, the activation, their product: ~4·ffn values per
token, 3.5× the model width each for Llama) from forward to backward. :func:`tiled_forward`
runs the MLP on tiles of ``tile_tokens`` tokens without recording a graph and keeps only its
input; backward recomputes each tile with autograd, takes that tile's gradients and drops it.
So at most one tile's intermediate ever exists, in forward and in backward, for one extra MLP
forward of compute. The parameters' gradients are summed over the tiles and returned through
the function's inputs (so FSDP2's unsharded parameters receive them as from any other op).

Norms are token-wise too, and their fp32 math keeps ~2.5 fp32 copies of their input for
backward (an RMSNorm of a bf16 model: 5× the input's bytes): tiled, a norm keeps only its input.

``UlyssesConfig(tiled_tokenwise=True)`` applies it to every block's MLP and to every norm of the
model (:func:`tile_tokenwise`). Only modules token-wise by construction are accepted: MLPs whose
leaves are ``nn.Linear``, activations and ``Identity`` (dropout would draw other masks in the
recompute and is refused), and norms over the last dimension (``nn.LayerNorm``, ``nn.RMSNorm``
and classes named ``*RMSNorm``/``*LayerNorm``, Hugging Face's convention). A call on anything
but one (B, T, C) tensor runs the module unchanged (a norm of q or k heads, say). On the
propagation path the module runs on this rank's local tokens (``tokenwise.run_on_local_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .tokenwise import is_moe_block, run_on_local_tokens

Tensor = torch.Tensor
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # Hugging Face, our llama / torchtitan, others


class _TiledTokenwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile_tokens: int, x: Tensor, *params: Tensor) -> Tensor:
        ctx.fn, ctx.tile_tokens = fn, tile_tokens
        ctx.save_for_backward(x, *params)
        return _in_tiles(fn, x.detach(), tile_tokens)  # detached: hooks see no inputs needing grad

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


def _in_tiles(fn, x: Tensor, tile_tokens: int) -> Tensor:
    """``fn`` of each tile of ``tile_tokens`` tokens along dim 1, concatenated (no graph kept
    when grad mode is off)."""
    return torch.cat([fn(x[:, s : s + tile_tokens]) for s in range(0, x.shape[1], tile_tokens)], dim=1)


def tiled_forward(module: nn.Module, forward, x: Tensor, tile_tokens: int) -> Tensor:
    """``forward(x)`` of a token-wise ``module`` in tiles of ``tile_tokens`` along dim 1.

    x: (B, T, C) plain tensor. Returns what ``forward(x)`` returns (one tensor), exactly. Without
    grad mode (inference, or an offloaded block's forward) the tiles are just computed in turn."""
    if x.shape[1] <= tile_tokens:
        return forward(x)
    if not torch.is_grad_enabled():
        return _in_tiles(forward, x, tile_tokens)
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


def is_norm(module: nn.Module) -> bool:
    """A normalization over the last dimension (token-wise)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


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
                        f"tiled_tokenwise: {type(inner).__name__}.{name} ({type(child).__name__}) is not token-wise by "
                        f"construction (its leaf modules: {', '.join(leaves)}; only Linear, activations, Identity "
                        "and dropout with p=0 are accepted): leave tiled_tokenwise=False for this model"
                    )
                found.append(child)
                break
    return found


def tile_tokenwise(model: nn.Module, blocks: list[nn.Module], tile_tokens: int | None = None) -> int:
    """Run each block's MLP and every norm of ``model`` in tiles (:func:`tiled_forward`);
    ``tile_tokens`` default: the model width (a tile's MLP intermediate is then ~ffn/C times a
    hidden state of C tokens, as DeepSpeed ALST's TiledMLP picks). Returns the modules tiled."""
    if tile_tokens is not None and (isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1):
        raise ValueError(f"UlyssesConfig(tile_tokens={tile_tokens!r}): an integer >= 1 or None")
    mlps = find_mlps(blocks)
    if not mlps:
        raise ValueError(f"tiled_tokenwise: no block has an MLP child named one of {MLP_NAMES}")
    modules = mlps + [m for m in model.modules() if is_norm(m) and not list(m.children())]
    for module in modules:
        original = module.forward

        def body(x, *args, _module=module, _original=original, **kwargs):
            if args or kwargs or not isinstance(x, Tensor) or isinstance(x, DTensor) or x.dim() != 3:
                return _original(x, *args, **kwargs)
            return tiled_forward(_module, _original, x, tile_tokens or x.shape[-1])

        module.forward = body
        run_on_local_tokens(module, strict=False)
    return len(modules)
