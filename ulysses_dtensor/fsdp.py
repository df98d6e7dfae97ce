"""FSDP2 over all dp × sp ranks (ZeRO-3 over the combined data- and sequence-parallel group)."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh


def find_blocks(model: nn.Module, block_classes: tuple | None = None) -> list[nn.Module]:
    """The transformer blocks to wrap one FSDP unit each.

    ``block_classes`` (classes or class names) if given; else Hugging Face's
    ``_no_split_modules``; else the children of the ModuleList/ModuleDict holding the most
    parameters (``layers``, ``h``, ``blocks`` ...).
    """
    names = block_classes or getattr(model, "_no_split_modules", None)
    if names:
        wanted = {c if isinstance(c, str) else c.__name__ for c in names}
        return _separable([m for m in model.modules() if type(m).__name__ in wanted], model)
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    if not containers:
        return []
    biggest = max(containers, key=lambda c: sum(p.numel() for p in c.parameters()))
    return list(biggest.values() if isinstance(biggest, nn.ModuleDict) else biggest)


def _separable(blocks: list[nn.Module], model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 can shard as units of their own: outermost only (Hugging Face lists
    nested classes, e.g. mBART's layers inside its encoder), and none sharing a parameter with
    the rest of the model (BERT's embeddings, tied to the LM head)."""
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    kept = []
    for b in (b for b in blocks if id(b) not in inside):
        members = {id(m) for m in b.modules()}
        outside = {id(p) for m in model.modules() if id(m) not in members for p in m.parameters(recurse=False)}
        if not any(id(p) in outside for p in b.parameters()):
            kept.append(b)
    return kept


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, blocks: list[nn.Module], reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each block, then the root, over the 1-D ``mesh`` of all dp × sp ranks.

    Gradients are *summed* over ranks (divide factor 1): every rank's loss is its share of the
    global token-weighted mean (see ``loss.token_weighted_cross_entropy``), so the sum is the
    single-process gradient of the global batch.
    """
    from torch.distributed.fsdp import fully_shard

    units = [fully_shard(b, mesh=mesh, reshard_after_forward=reshard_after_forward) for b in blocks]
    units.append(fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        # A plain SUM: no PreMulSum (which gloo lacks), and nothing to scale with a factor of 1.
        unit.set_force_sum_reduction_for_comms(True)
