"""UlyssesConfig(compile=True) on the default path (FSDP2 on): each block compiled with
fullgraph=True after activation checkpointing and before FSDP2. One training step (loss, every
gradient, parameters after AdamW) against one process, float64; the per-block graphs' collectives
counted; whole-model fullgraph compile of an FSDP model refused with our error."""

from __future__ import annotations

import copy

import pytest
import torch

from ulysses_dtensor.inputs import local_slice
from helpers import VOCAB, build_model, loss_and_logits, make_mesh, refusal, rel_err
from titan_builders import TITAN_VOCAB, build_debugmodel
from hf_builders import build_hf
from zoo_models import NanoGPT

LAYERS = {"gpt": 2, "llama": 2, "titan": 6}


def _build(kind: str):
    if kind == "titan":
        return build_debugmodel("sdpa").double()
    return build_model(kind, torch.float64)


def _loss(kind, model, tokens, labels):
    if kind == "titan":
        logits = model(tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return loss_and_logits(kind, model, tokens, labels)[0]


def _rank_compiled_step(ctx, kind, dp, sp, activation_checkpointing, backend):
    """Errors of one compiled, FSDP-sharded step against the one-process step; the collectives of
    the blocks' graphs (counting backend)."""
    # every block compiled by nn.Module.compile shares one code object and its recompile limit:
    # a fresh Dynamo cache for each model this rank group compiles
    torch._dynamo.reset()
    import ulysses_dtensor as U
    from ulysses_dtensor.compile import counting_backend

    mesh = make_mesh(ctx, dp, sp)
    ref = _build(kind)
    graphs = []
    config = U.UlyssesConfig(compile=True, activation_checkpointing=activation_checkpointing,
                             compile_backend=counting_backend(graphs) if backend == "counting" else backend)
    model = U.parallelize_module(copy.deepcopy(ref), mesh, config)
    vocab = TITAN_VOCAB if kind == "titan" else VOCAB
    B, N = 2, 4 * sp + 3
    gen = torch.Generator().manual_seed(sp)
    tokens = torch.randint(0, vocab, (dp * B, N), generator=gen)
    labels = torch.randint(0, vocab, (dp * B, N), generator=gen) if kind != "llama" else tokens.clone()
    ref_loss = _loss(kind, ref, tokens, labels)
    ref_loss.backward()
    torch.optim.AdamW(ref.parameters(), lr=1e-2).step()

    d = mesh.get_local_rank("dp") if mesh.ndim == 2 else 0
    rows = slice(d * B, (d + 1) * B)
    if kind == "titan":
        # torchtitan's model returns this rank's logits; the one-process mean over all tokens is
        # the sum of every rank's share (FSDP sums the gradients)
        logits = model(tokens[rows])
        local_labels = local_slice(labels[rows], mesh["sp"].get_local_rank() if mesh.ndim == 2 else mesh.get_local_rank(), sp, N)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), local_labels.flatten(), reduction="sum") / (B * N)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=mesh.get_group())
    else:
        loss = _loss(kind, model, tokens[rows], labels[rows])
        total = loss.detach()
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    ref_params = dict(ref.named_parameters())
    grads = params = 0.0
    for name, p in model.named_parameters():
        plain = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        grads = max(grads, rel_err(p.grad.full_tensor(), ref_params[plain].grad))
        params = max(params, rel_err(p.full_tensor().detach(), ref_params[plain].detach()))
    counts = [(g.kind, g.counts.get("all_to_all", 0)) for g in graphs]
    # the loss of every rank is the global token-weighted mean (over dp × sp), the one-process loss
    return {"loss": abs(total.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grads": grads, "params": params}, counts, len(U.compile.compiled_blocks(model))


@pytest.mark.parametrize("activation_checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("sp", [2, 4])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_compiled_blocks_with_fsdp_match_one_process(ranks4, kind, sp, activation_checkpointing):
    """FSDP2 on, every block compiled (fullgraph) through a counting backend: float64 step parity,
    2 all-to-alls per block graph forward; backward 2, or 4 with full checkpointing (recompute)."""
    for errors, graphs, compiled in ranks4.run(_rank_compiled_step, kind, 1, sp, activation_checkpointing,
                                               "counting", world=sp, timeout_s=900):
        assert compiled == LAYERS[kind], compiled
        # HF computes its loss in float32 from float64 logits, in one process too: that bounds the
        # loss and the gradients flowing from it
        tol = 1e-10 if kind == "gpt" else 1e-6
        assert max(errors.values()) <= tol, (kind, sp, activation_checkpointing, errors)
        backward = 4 if activation_checkpointing == "full" else 2
        # identical blocks share one forward and one backward graph
        assert graphs == [("forward", 2), ("backward", backward)], graphs


def test_compiled_blocks_dp2_sp2_inductor(ranks4):
    """(dp=2, sp=2), FSDP2 over all four ranks, Inductor, selective checkpointing."""
    for errors, _, compiled in ranks4.run(_rank_compiled_step, "gpt", 2, 2, "selective", "inductor",
                                          world=4, timeout_s=900):
        assert compiled == LAYERS["gpt"]
        assert max(errors.values()) <= 1e-10, errors


def test_compiled_torchtitan_blocks_with_fsdp(ranks4):
    """torchtitan's Llama3 debugmodel (SDPA inner attention), 6 blocks compiled, FSDP2, sp=2."""
    for errors, graphs, compiled in ranks4.run(_rank_compiled_step, "titan", 1, 2, "full", "counting",
                                               world=2, timeout_s=900):
        assert compiled == LAYERS["titan"]
        assert max(errors.values()) <= 1e-10, errors
        assert graphs == [("forward", 2), ("backward", 4)], graphs


def _rank_fullgraph_refused(ctx):
    # every block compiled by nn.Module.compile shares one code object and its recompile limit:
    # a fresh Dynamo cache for each model this rank group compiles
    torch._dynamo.reset()
    import ulysses_dtensor as U
    from ulysses_dtensor.compile import WholeModelCompileError

    model = U.parallelize_module(build_model("gpt", torch.float64), make_mesh(ctx, 1, ctx.world))
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    try:
        torch.compile(model, backend="aot_eager", fullgraph=True)(tokens, tokens)
    except WholeModelCompileError as e:
        assert isinstance(e, ValueError)
        return str(e)
    return None


def test_whole_model_fullgraph_compile_with_fsdp_is_refused_naming_the_option(ranks4):
    for message in ranks4.run(_rank_fullgraph_refused, world=2, timeout_s=600):
        assert message is not None and "UlyssesConfig(compile=True)" in message, message
        assert "FSDP2" in message and "marked as skipped" not in message, message


def _rank_compile_refusals(ctx):
    import ulysses_dtensor as U

    mesh = make_mesh(ctx, 1, ctx.world)
    messages = [refusal(U.parallelize_module, build_model("gpt", torch.float64), mesh, config)
                for config in (U.UlyssesConfig(compile=True, activation_checkpointing="offload"),
                               U.UlyssesConfig(compile=True, head_chunks=2),
                               U.UlyssesConfig(compile=True, propagation=True),
                               U.UlyssesConfig(compile="yes"))]
    # derives positions from the length it sees: wrong on local shards
    messages.append(refusal(U.parallelize_module, NanoGPT(), mesh, U.UlyssesConfig(compile=True)))
    return messages


def test_compile_option_refusals(ranks4):
    """Options that run eager only are refused with compile=True, before any collective."""
    messages = ranks4.run(_rank_compile_refusals, world=2)[0]
    assert "runs eager only" in messages[0] and "offload" in messages[0], messages
    assert "runs eager only" in messages[1] and "head_chunks=2" in messages[1], messages
    assert "local-tensor path" in messages[2], messages
    assert "True or False" in messages[3], messages
    assert "NanoGPT" in messages[4] and "takes no position argument" in messages[4], messages


def _rank_explain_blocks(ctx):
    # every block compiled by nn.Module.compile shares one code object and its recompile limit:
    # a fresh Dynamo cache for each model this rank group compiles
    torch._dynamo.reset()
    import ulysses_dtensor as U

    model = U.parallelize_module(build_model("gpt", torch.float64), make_mesh(ctx, 1, ctx.world),
                                 U.UlyssesConfig(compile=True, compile_backend="aot_eager"))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    report = U.explain(model, tokens, tokens)
    # the model still trains with its own compiled blocks afterwards
    _, loss = model(tokens, tokens)
    loss.backward()
    return (report.attention_calls, report.compiled_blocks, [(g.kind, dict(g.counts)) for g in report.graphs],
            str(report), torch.isfinite(loss).item())


def test_explain_reports_per_block_graphs(ranks4):
    calls, blocks, graphs, text, trained = ranks4.run(_rank_explain_blocks, world=2, timeout_s=600)[0]
    assert calls == 2 and blocks == 2 and trained
    assert graphs == [("forward", {"all_to_all": 2}), ("backward", {"all_to_all": 2})], graphs
    assert "blocks compiled with fullgraph=True: 2" in text, text


def _rank_compiled_family(ctx, family):
    """Loss and gradient errors of an HF family with compiled blocks and FSDP2 at sp = world."""
    # every block compiled by nn.Module.compile shares one code object and its recompile limit:
    # a fresh Dynamo cache for each model this rank group compiles
    torch._dynamo.reset()
    import ulysses_dtensor as U
    from ulysses_dtensor.compile import counting_backend

    ref = build_hf(family)
    graphs = []
    model = U.parallelize_module(copy.deepcopy(ref), make_mesh(ctx, 1, ctx.world),
                                 U.UlyssesConfig(compile=True, compile_backend=counting_backend(graphs)))
    tokens = torch.randint(0, VOCAB, (2, 4 * ctx.world + 3), generator=torch.Generator().manual_seed(3))
    ref_loss = ref(input_ids=tokens, labels=tokens).loss
    ref_loss.backward()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    ref_params = dict(ref.named_parameters())
    grads = max(rel_err(p.grad.full_tensor(), ref_params[n.replace("_orig_mod.", "")].grad)
                for n, p in model.named_parameters())
    return abs(loss.item() - ref_loss.item()) / ref_loss.item(), grads, [(g.kind, g.counts.get("all_to_all", 0)) for g in graphs]


@pytest.mark.parametrize("family", ["phi3", "gpt-neox", "gpt2", "olmo2"])
def test_compiled_blocks_of_hf_families(ranks4, family):
    """More HF families with UlyssesConfig(compile=True), FSDP2, sp=2 (HF's float32 loss sets 1e-6)."""
    for loss_err, grad_err, graphs in ranks4.run(_rank_compiled_family, family, world=2, timeout_s=900):
        assert loss_err <= 1e-6 and grad_err <= 1e-6, (family, loss_err, grad_err)
        assert graphs == [("forward", 2), ("backward", 2)], graphs


def _rank_hf_refused(ctx, family):
    import ulysses_dtensor as U

    return refusal(U.parallelize_module, build_hf(family), make_mesh(ctx, 1, ctx.world), U.UlyssesConfig(compile=True))


def test_compiled_blocks_refuse_sliding_windows_and_experts(ranks4):
    """Refused at setup: a sliding window (the local path builds causal masks only) and MoE
    blocks (their load-balancing loss needs the propagation path; HF's expert loop does not
    compile with fullgraph)."""
    message = ranks4.run(_rank_hf_refused, "mistral-window", world=2)[0]
    assert message is not None and "window" in message, message
    message = ranks4.run(_rank_hf_refused, "qwen3-moe", world=2)[0]
    assert message is not None and "MoE blocks run on the propagation path only" in message, message
