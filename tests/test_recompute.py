"""Activation checkpointing with parallelize_module: the recompute in backward runs inside the
Ulysses rewrite, so gradients equal one process's (float64), with torch's checkpoint_wrapper and
with Hugging Face's gradient_checkpointing_enable()."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import build_model, checkpoint_blocks, loss_and_logits, make_mesh, refusal, rel_err, summed_grad_error


def _rank_checkpointed_step(ctx, kind, how, sp, N):
    import ulysses_dtensor as U
    from ulysses_dtensor.fsdp import find_blocks

    ref = build_model(kind, torch.float64)
    model = copy.deepcopy(ref)
    checkpoint_blocks(model, how)
    assert find_blocks(model)
    model = U.parallelize_module(model, make_mesh(ctx, 1, sp), U.UlyssesConfig(fsdp=False))
    gen = torch.Generator().manual_seed(N)
    tokens = torch.randint(0, 64, (2, N), generator=gen)
    labels = torch.randint(0, 64, (2, N), generator=gen)
    # HF models run the chunked loss (float64): the reference is our own float64 loss
    ref_loss, _ = loss_and_logits(kind, ref, tokens, labels, own_loss=kind != "gpt")
    ref_loss.backward()
    loss, _ = loss_and_logits(kind, model, tokens, labels)
    loss.backward()
    return summed_grad_error(model, ref, ctx.group)


@pytest.mark.parametrize("kind,how", [("gpt", "torch"), ("llama", "hf")])
@pytest.mark.parametrize("sp,N", [(2, 24), (4, 30)])
def test_activation_checkpointing_gradients_match_one_process(ranks4, kind, how, sp, N):
    for err in ranks4.run(_rank_checkpointed_step, kind, how, sp, N, world=sp):
        assert err < 1e-10, err


# ---------------------------------------------------------------------------------------------
# UlyssesConfig(activation_checkpointing=...): the library's own modes


def _rank_checkpointing_mode(ctx, kind, mode, N):
    """One fwd+bwd with the mode vs one process; the all-to-all bytes counted in eager, and the
    all-to-alls in the graphs torch.compile captures."""
    import torch._dynamo as dynamo

    import ulysses_dtensor as U
    from ulysses_dtensor.comm_counter import CollectiveCounter
    from ulysses_dtensor.compile import counting_backend

    ref = build_model(kind, torch.float64)
    config = U.UlyssesConfig(fsdp=False, activation_checkpointing=mode)
    model = U.parallelize_module(copy.deepcopy(ref), make_mesh(ctx, 1, ctx.world), config)
    gen = torch.Generator().manual_seed(N)
    tokens = torch.randint(0, 64, (2, N), generator=gen)
    labels = torch.randint(0, 64, (2, N), generator=gen)
    # eager: the chunked loss (float64) for HF models, so our own float64 reference; compiled
    # forwards run the local path, where HF's own float32 loss runs (loss_tol below)
    ref_loss, _ = loss_and_logits(kind, ref, tokens, labels, own_loss=kind != "gpt")
    ref_loss.backward()
    with CollectiveCounter() as forward:
        loss, _ = loss_and_logits(kind, model, tokens, labels, need_logits=False)
    with CollectiveCounter() as backward:
        loss.backward()
    grads = summed_grad_error(model, ref, ctx.group)
    graphs = []
    dynamo.reset()
    c_loss, _ = loss_and_logits(kind, torch.compile(model, backend=counting_backend(graphs), fullgraph=True), tokens, labels)
    c_loss.backward()
    dynamo.reset()
    return {
        "loss": rel_err(loss.detach(), ref_loss.detach()),
        "compiled_loss": rel_err(c_loss.detach(), ref_loss.detach()),
        "grads": grads,
        "forward_bytes": forward.bytes_sent("all_to_all"),
        "backward_bytes": backward.bytes_sent("all_to_all"),
        "graphs": [(g.kind, g.counts["all_to_all"]) for g in graphs],
    }


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("sp,N", [(2, 24), (4, 30)])
def test_checkpointing_modes_exact_and_selective_reruns_no_collective(ranks4, kind, sp, N):
    """"selective" sends what no checkpointing sends; "full" sends the forward's exchanges again in
    backward; both exact in float64, eager and compiled."""
    results = {mode: ranks4.run(_rank_checkpointing_mode, kind, mode, N, world=sp)
               for mode in ("none", "selective", "full")}
    layers = 2
    loss_tol = 1e-10 if kind == "gpt" else 1e-6  # compiled HF runs its own float32 loss
    for mode, per_rank in results.items():
        for rank, r in enumerate(per_rank):
            assert r["grads"] < 1e-10 and r["loss"] < 1e-10 and r["compiled_loss"] < loss_tol, (mode, r)
            plain = results["none"][rank]
            assert r["forward_bytes"] == plain["forward_bytes"] > 0, (mode, r)
            recomputed = plain["forward_bytes"] if mode == "full" else 0
            assert r["backward_bytes"] == plain["backward_bytes"] + recomputed, (mode, r)
            backward = {"none": 2, "selective": 2, "full": 4}[mode] * layers
            assert r["graphs"] == [("forward", 2 * layers), ("backward", backward)], (mode, r["graphs"])


def _rank_checkpointing_refusals(ctx):
    import ulysses_dtensor as U
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    messages = []
    for mode, prepare in (("partial", None), ("full", "hf"), ("selective", "wrapped")):
        model = build_model("llama" if prepare == "hf" else "gpt", torch.float64)
        if prepare == "hf":
            model.gradient_checkpointing_enable()
        elif prepare == "wrapped":
            model.layers[0] = checkpoint_wrapper(model.layers[0])
        messages.append(refusal(U.parallelize_module, model, make_mesh(ctx, 1, ctx.world),
                                U.UlyssesConfig(fsdp=False, activation_checkpointing=mode)))
    return messages


def test_checkpointing_mode_refusals(ranks4):
    for messages in ranks4.run(_rank_checkpointing_refusals, world=2):
        assert len(messages) == 3, messages
        assert "choose one of" in messages[0]
        assert "gradient checkpointing enabled" in messages[1]
        assert "already checkpoint-wrapped" in messages[2]
