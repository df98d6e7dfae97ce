"""Activation checkpointing with parallelize_module: the recompute in backward runs inside the
Ulysses rewrite, so gradients equal one process's (float64), with torch's checkpoint_wrapper and
with Hugging Face's gradient_checkpointing_enable()."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import rel_err
from test_parallelize import _build, _loss_and_logits, _mesh


def _rank_checkpointed_step(ctx, kind, how, sp, N):
    import ulysses_dtensor as U
    from ulysses_dtensor.fsdp import find_blocks

    ref = _build(kind, torch.float64)
    model = copy.deepcopy(ref)
    if how == "torch":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    elif how == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert find_blocks(model) or how == "none"
    model = U.parallelize_module(model, _mesh(ctx, 1, sp), U.UlyssesConfig(fsdp=False))
    gen = torch.Generator().manual_seed(N)
    tokens = torch.randint(0, 64, (2, N), generator=gen)
    labels = torch.randint(0, 64, (2, N), generator=gen)
    ref_loss, _ = _loss_and_logits(kind, ref, tokens, labels)
    ref_loss.backward()
    loss, _ = _loss_and_logits(kind, model, tokens, labels)
    loss.backward()
    ref_grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in ref.named_parameters()}
    errors = []
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)  # without FSDP each rank holds its share
        errors.append(rel_err(grad, ref_grads[name.replace("_checkpoint_wrapped_module.", "")]))
    return max(errors)


@pytest.mark.parametrize("kind,how", [("gpt", "torch"), ("llama", "hf")])
@pytest.mark.parametrize("sp,N", [(2, 24), (4, 30)])
def test_activation_checkpointing_gradients_match_one_process(ranks4, kind, how, sp, N):
    for err in ranks4.run(_rank_checkpointed_step, kind, how, sp, N, world=sp):
        assert err < 1e-10, err
