"""Mixture-of-experts layers on the propagation path: token-wise, so run on the local shards.

An MoE block routes each token to its top-k experts: flattened tokens, ``topk``, gathers and
scatters by expert, data-dependent sizes. DTensor cannot propagate that over a sharded sequence
without gathering it, but nothing in it crosses tokens, so each rank runs the block on its own
(B, N_r, C) tokens as plain tensors and the output re-enters as ``Shard(1)``.

The router's load-balancing loss averages over *all* tokens: for each propagated forward,
Hugging Face's ``load_balancing_loss_func`` is rebound (in the modules defining the model's
classes, ``namespaces.rebound``) to a version that sums its per-expert counts and probabilities
over the sp ranks, so every rank gets the single-process aux loss and a gradient for its own
tokens. After the forward the original is back.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from .propagation import from_local, replicated_value


def is_moe_block(module: nn.Module) -> bool:
    """Hugging Face's convention for sparse MoE blocks: a ``gate`` router and ``experts``."""
    return isinstance(getattr(module, "gate", None), nn.Module) and isinstance(getattr(module, "experts", None), nn.Module)


def run_on_local_tokens(module: nn.Module, strict: bool = True) -> None:
    """Make ``module.forward`` take ``Shard(1)`` (B, N, C) DTensors, run on the local tokens and
    return ``Shard(1)``; plain inputs (the local-tensor path, one process) run unchanged. Other
    DTensors raise (``strict``) or run the forward as it is on them."""
    original = module.forward

    def forward_on_local_tokens(hidden_states, *args, **kwargs):
        if not isinstance(hidden_states, DTensor):
            return original(hidden_states, *args, **kwargs)
        if hidden_states.placements != (Shard(1),) or hidden_states.dim() != 3:
            if not strict:
                return original(hidden_states, *args, **kwargs)
            raise ValueError(
                f"{type(module).__name__} got hidden states placed {hidden_states.placements} with shape "
                f"{tuple(hidden_states.shape)}; a token-wise MoE block needs (B, N, C) sharded on the sequence"
            )
        local = hidden_states.to_local()
        out = original(local, *args, **kwargs)

        def back(t):
            if isinstance(t, torch.Tensor) and t.shape[:2] == local.shape[:2]:
                return from_local(t, hidden_states, torch.Size((*hidden_states.shape[:2], *t.shape[2:])))
            return t  # router logits (B * N_r, E): read by the rebound load-balancing loss

        return tuple(back(t) for t in out) if isinstance(out, tuple) else back(out)

    module.forward = forward_on_local_tokens


def global_load_balancing_loss(original: Callable, context: Callable) -> Callable:
    """``load_balancing_loss_func`` over all tokens of the sp ranks. ``context()`` gives the
    running parallelized forward's (sp mesh, global N, this rank's token offset and count, the
    guard's ``allowed``), or None outside one."""

    def load_balancing_loss_func(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        ctx = context()
        if ctx is None or gate_logits is None or not isinstance(gate_logits, tuple) or isinstance(gate_logits[0], DTensor):
            return original(gate_logits, num_experts, top_k, attention_mask)
        mesh, seq_len, offset, n_local, allowed = ctx
        device = gate_logits[0].device
        tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
        probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
        rows = torch.zeros((), dtype=torch.float32, device=device)
        weight = None
        if attention_mask is not None:
            mask = attention_mask.to_local() if isinstance(attention_mask, DTensor) else attention_mask
            weight = mask.narrow(1, offset, n_local).reshape(-1).to(device=device, dtype=torch.float32)
        for layer_gate in gate_logits:
            routing = torch.softmax(layer_gate.to(device), dim=-1)
            _, selected = torch.topk(routing, top_k, dim=-1)
            w = torch.ones(routing.shape[0], dtype=torch.float32, device=device) if weight is None else weight
            tokens = tokens + torch.zeros_like(tokens).scatter_add_(0, selected.reshape(-1), w.repeat_interleave(top_k))
            probs = probs + (routing.float() * w.unsqueeze(-1)).sum(dim=0)
            rows = rows + w.sum()
        local = torch.cat([tokens, probs, rows.reshape(1)])
        with allowed():
            total = funcol.all_reduce(local.detach(), "sum", mesh.get_group())
        # value: the global sums; gradient: this rank's own tokens' probabilities
        total = local + (total - local.detach())
        tokens, probs, rows = total[:num_experts].detach(), total[num_experts:-1], total[-1].detach()
        loss = torch.sum((tokens / rows) * (probs / rows)) * num_experts
        return replicated_value(loss, mesh)

    return load_balancing_loss_func


def use_local_moe(model: nn.Module) -> int:
    """Run the model's MoE blocks on local tokens; returns the number found. (The global
    load-balancing loss is rebound per forward: :func:`global_load_balancing_loss`.)"""
    blocks = [m for m in model.modules() if is_moe_block(m)]
    for block in blocks:
        run_on_local_tokens(block)
    return len(blocks)
