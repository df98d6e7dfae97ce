"""parallelize_module on real, unmodified models vs one process: loss, logits, every gradient,
parameters after an AdamW step; eager and compiled; refusals."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import VOCAB, build_model, gathered_grad_error, loss_and_logits, make_mesh, refusal, rel_err
from ulysses_dtensor.tools.llama import Llama as GPT, LlamaConfig as GPTConfig
from ulysses_dtensor.tools.rank_group import RankFailure
from ulysses_dtensor.layout import seq_shard_sizes


def _rank_train_step(ctx, kind, dp, sp, N, dtype, compile_backend=None, via_shard_batch=False):
    import ulysses_dtensor as U

    mesh = make_mesh(ctx, dp, sp)
    ref = build_model(kind, dtype)
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    gen = torch.Generator().manual_seed(N)
    B = 2
    tokens = torch.randint(0, VOCAB, (dp * B, N), generator=gen)
    labels = tokens.clone() if kind != "gpt" else torch.randint(0, VOCAB, (dp * B, N), generator=gen)
    labels[:, : N // 4] = -100  # ignored tokens weigh nothing in the global mean

    # Single process on the global batch (every rank computes it; they agree). HF models run the
    # chunked loss in eager (float64 here): the reference is our own float64 loss then.
    own_loss = kind != "gpt" and compile_backend is None
    ref_loss, ref_logits = loss_and_logits(kind, ref, tokens, labels, own_loss=own_loss)
    ref_loss.backward()
    # AdamW's first step is ~lr*sign(g): where |g| is tiny, float32 rounding of g (summation
    # order differs between one process and P ranks) flips the sign and moves the parameter by
    # up to 2*lr. So float32 runs use a typical LLM learning rate (1e-4) and float64 runs a large
    # one (1e-2), where any real difference would show.
    lr = 1e-2 if dtype == torch.float64 else 1e-4
    torch.optim.AdamW(ref.parameters(), lr=lr).step()
    # The same single-process step in float64: how far float32 rounding alone moves the result.
    ref64 = build_model(kind, torch.float64)
    loss_and_logits(kind, ref64, tokens, labels, own_loss=own_loss)[0].backward()
    torch.optim.AdamW(ref64.parameters(), lr=lr).step()

    d = mesh.get_local_rank("dp") if mesh.ndim == 2 else 0
    rows = slice(d * B, (d + 1) * B)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    loss, logits = loss_and_logits(kind, run, tokens[rows], labels[rows], mesh if via_shard_batch else None)
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    opt.step()

    errors = {
        "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        "logits": rel_err(U.gather_sequence(logits.detach(), mesh), ref_logits[rows].detach()),
    }
    ref_params, ref64_params = dict(ref.named_parameters()), dict(ref64.named_parameters())
    grad_err = param_err = rounding = 0.0
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        grad_err = max(grad_err, rel_err(grad, ref_params[name].grad))
        param_err = max(param_err, rel_err(value.detach(), ref_params[name].detach()))
        rounding = max(rounding, rel_err(ref_params[name].detach(), ref64_params[name].detach()))
    errors.update(grads=grad_err, params_after_adamw=param_err)
    return errors, rounding


def _assert_close(results, tol, what, loss_tol=None):
    """Every error <= tol. ``loss_tol`` for models whose own loss runs in float32 (HF upcasts
    logits to float32), which bounds the loss and the gradients flowing from it."""
    for rank, (errors, rounding) in enumerate(results):
        print(f"{what}: rank {rank} errors {errors}; single-process float32 vs float64 step {rounding:.2g}")
        for name, err in errors.items():
            bound = tol if loss_tol is None else loss_tol
            if name == "params_after_adamw":
                # Adam's sign flips (above) scale with float32 rounding: allow what rounding alone
                # does to the single-process step (a wrong shard or update is off by O(lr/|p|) ≫ this).
                bound = max(bound, 3 * rounding)
            assert err <= bound, f"{what}: rank {rank} {name} relative error {err:.3g} > {bound:g}"


@pytest.mark.parametrize("sp,N", [(2, 24), (2, 23), (4, 32), (4, 30)])
def test_gpt_recipe_matches_single_process(ranks4, sp, N):
    results = ranks4.run(_rank_train_step, "gpt", 1, sp, N, torch.float64, world=sp)
    _assert_close(results, 1e-10, f"gpt sp={sp} N={N}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [32, 27])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_dp2_sp2_fsdp_step_matches_single_process(ranks4, kind, N, dtype):
    """(dp=2, sp=2), FSDP2 over all four ranks: loss, every gradient, parameters after AdamW."""
    results = ranks4.run(_rank_train_step, kind, 2, 2, N, dtype, world=4)
    if dtype == torch.float64:
        _assert_close(results, 1e-10, f"{kind} dp=2 sp=2 N={N}")
    else:
        _assert_close(results, 1e-5, f"{kind} dp=2 sp=2 N={N} float32")


@pytest.mark.parametrize("sp,N", [(2, 20), (4, 30)])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_causal_lm_matches_single_process(ranks4, kind, sp, N):
    """HF models with GQA (8 heads, 2 kv heads), labels shifted by the wrapper, the chunked loss
    (float64) against our float64 loss of the one-process logits."""
    results = ranks4.run(_rank_train_step, kind, 1, sp, N, torch.float64, world=sp)
    _assert_close(results, 1e-10, f"{kind} sp={sp} N={N}")


def test_shard_batch_inputs_match_single_process(ranks4):
    """The data-loader path: shard_batch (labels shifted before sharding, global positions)."""
    results = ranks4.run(_rank_train_step, "llama", 2, 2, 27, torch.float64, None, True, world=4)
    _assert_close(results, 1e-10, "llama via shard_batch")


@pytest.mark.parametrize("kind,backend", [("gpt", "inductor"), ("gpt", "aot_eager"), ("llama", "aot_eager")])
def test_compiled_model_matches_single_process(ranks4, kind, backend):
    """torch.compile(model) after parallelize_module. (HF's loss runs in float32, and Inductor
    reorders float32 math, so the HF model is compiled with aot_eager for a 1e-6 comparison.)"""
    results = ranks4.run(_rank_train_step, kind, 1, 2, 24, torch.float64, backend, world=2, timeout_s=900)
    _assert_close(results, 1e-10, f"compiled {kind}", loss_tol=None if kind == "gpt" else 1e-6)


class _ManualAttention(nn.Module):
    """Attention written as softmax(QK^T): cannot be made sequence parallel by rewriting SDPA."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        scores = x @ x.transpose(-1, -2)
        return self.proj(scores.softmax(-1) @ x)


def _rank_refusal(ctx, case):
    """The refused call under a collective counter; models are built and parallelized before it
    (parallelize_module's setup check is itself a collective, run by every rank)."""
    import ulysses_dtensor as U
    from ulysses_dtensor.comm_counter import CollectiveCounter

    mesh = make_mesh(ctx, 1, ctx.world)
    counter = CollectiveCounter()
    try:
        if case in ("manual_attention", "manual_attention_local"):
            torch.manual_seed(0)
            config = U.UlyssesConfig(fsdp=False, propagation=case == "manual_attention")
            model = U.parallelize_module(_ManualAttention(), mesh, config)
            with counter:
                model(torch.randn(1, 8, 8))
        elif case == "hf_eager":
            model = build_model("llama", torch.float32)
            model.config._attn_implementation = "eager"
            with counter:
                U.parallelize_module(model, mesh)
        elif case == "no_sp_dim":
            from torch.distributed.device_mesh import DeviceMesh

            with counter:
                U.parallelize_module(build_model("gpt", torch.float32), DeviceMesh.from_group(ctx.group, "cpu", mesh_dim_names=("tp",)))
        elif case == "seq_shorter_than_sp":
            model = U.parallelize_module(build_model("gpt", torch.float32), mesh)
            with counter:
                model(torch.zeros(1, 2, dtype=torch.long))
        elif case == "padding_mask":
            model = U.parallelize_module(build_model("llama", torch.float32), mesh, U.UlyssesConfig(propagation=False))
            mask = torch.ones(1, 8, dtype=torch.long)
            mask[0, :2] = 0
            with counter:
                model(input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=mask)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), counter.counts()
    return None, "", counter.counts()


@pytest.mark.parametrize(
    "case,error,pattern,collectives_allowed",
    [
        # raised after the first forward, which every rank ran alike (its shape check included)
        # propagation: refused at the op that would gather the sequence, before that collective
        ("manual_attention", "RuntimeError", "on a sequence-sharded activation", True),
        ("manual_attention_local", "RuntimeError", "no F.scaled_dot_product_attention call", True),
        ("hf_eager", "ValueError", "attn_implementation='sdpa'", False),
        ("no_sp_dim", "ValueError", "needs an 'sp' dim", False),
        ("seq_shorter_than_sp", "ValueError", "shorter than the sequence-parallel degree", False),
        ("padding_mask", "ValueError", "no padding", False),  # propagation=False (the default takes padding)
    ],
)
def test_refusals_are_clear_and_early(ranks4, case, error, pattern, collectives_allowed):
    for name, msg, counts in ranks4.run(_rank_refusal, case, world=4):
        assert name == error and pattern in msg, (name, msg)
        assert collectives_allowed or not counts, f"{case}: collectives ran before the error: {counts}"


def _rank_flex_model(ctx, N):
    import ulysses_dtensor as U
    from flex_model import FlexModel

    mesh = make_mesh(ctx, 1, ctx.world)
    torch.manual_seed(0)
    ref = FlexModel()
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    tokens = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(N))
    with torch.no_grad():
        out = U.gather_sequence(model(tokens), mesh)
        ref_out = ref(tokens)  # same module globals: outside a parallelized forward, plain flex
    return rel_err(out, ref_out)


@pytest.mark.parametrize("sp,N", [(2, 40), (4, 37)])
def test_direct_flex_attention_calls_forward_matches(ranks4, sp, N):
    """A model calling flex_attention with a BlockMask of its (local) length: rebuilt globally."""
    for err in ranks4.run(_rank_flex_model, N, world=sp):
        assert err <= 1e-5, err


def _rank_gpt_config(ctx, heads, kv_heads, N, dp):
    import ulysses_dtensor as U

    mesh = make_mesh(ctx, dp, ctx.world // dp)
    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=VOCAB, max_seq_len=64, dim=8 * heads, n_heads=heads, n_kv_heads=kv_heads)).double()
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    gen = torch.Generator().manual_seed(N)
    tokens = torch.randint(0, VOCAB, (2 * dp, N), generator=gen)
    targets = torch.randint(0, VOCAB, (2 * dp, N), generator=gen).masked_fill_(lambda_ignore(N, dp), -100)
    ref_logits, ref_loss = ref(tokens, targets)
    ref_loss.backward()
    d = mesh.get_local_rank("dp") if mesh.ndim == 2 else 0
    logits, loss = model(tokens[2 * d : 2 * d + 2], targets[2 * d : 2 * d + 2])
    loss.backward()
    return max(
        abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        rel_err(U.gather_sequence(logits.detach(), mesh), ref_logits[2 * d : 2 * d + 2].detach()),
        gathered_grad_error(model, ref),
    )


def lambda_ignore(N, dp):
    return torch.rand(2 * dp, N, generator=torch.Generator().manual_seed(7)) < 0.3


@settings(max_examples=int(os.environ.get("ULYSSES_EXAMPLES", "40")) // 2)
@given(
    kv_heads=st.integers(1, 4), group=st.integers(1, 3), extra=st.integers(0, 9),
    layout=st.sampled_from([(1, 1), (1, 2), (1, 3), (1, 4), (2, 2)]),
)
def test_gpt_property_any_heads_kv_heads_length_layout(ranks4, kv_heads, group, extra, layout):
    """Random GQA shapes (incl. H and N not divisible by sp, kv_heads < sp), 1-D and (dp, sp)
    meshes, FSDP: loss, logits and every gradient equal one process in float64."""
    dp, sp = layout
    N = sp + extra
    if 0 in seq_shard_sizes(N, sp):  # e.g. N=4 over sp=3: shards 2, 2, 0 -> refused, clearly
        with pytest.raises(RankFailure, match="without tokens"):
            ranks4.run(_rank_gpt_config, kv_heads * group, kv_heads, N, dp, world=dp * sp)
        return
    err = ranks4.run(_rank_gpt_config, kv_heads * group, kv_heads, N, dp, world=dp * sp)
    assert max(err) <= 1e-10, (err, kv_heads * group, kv_heads, N, layout)


def _rank_parallel_style(ctx, N, ours):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import parallelize_module as torch_parallelize

    from ulysses_dtensor.tools.llama import Attention
    from ulysses_dtensor import UlyssesAttention, parallelize_module

    torch.manual_seed(0)
    ref = Attention(GPTConfig(dim=32, n_heads=4, n_kv_heads=2)).double()
    # ours with a ParallelStyle (or a plan dict) as third argument is torch's parallelize_module
    plan = {"": UlyssesAttention()} if ours else UlyssesAttention()
    model = (parallelize_module if ours else torch_parallelize)(copy.deepcopy(ref), DeviceMesh.from_group(ctx.group, "cpu"), plan)
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(2, N, 32, generator=gen, dtype=torch.float64)
    freqs = GPT(GPTConfig(dim=32, n_heads=4, max_seq_len=N)).freqs_cis
    n = N // ctx.world
    rows = slice(ctx.rank * n, (ctx.rank + 1) * n)
    x_local = x[:, rows].clone().requires_grad_()
    out = model(x_local, freqs[rows])
    out.pow(2).sum().backward()
    x_ref = x.clone().requires_grad_()
    ref_out = ref(x_ref, freqs)
    ref_out.pow(2).sum().backward()
    return rel_err(out.detach(), ref_out[:, rows].detach()), rel_err(x_local.grad, x_ref.grad[:, rows])


def test_ulysses_attention_parallel_style_in_torch_plan(ranks4):
    """UlyssesAttention() in torch's own parallelize_module: output and input gradient exact."""
    for ours in (False, True):
        for errs in ranks4.run(_rank_parallel_style, 24, ours, world=4):
            assert max(errs) <= 1e-10, (ours, errs)


def _rank_handle(ctx):
    import ulysses_dtensor as U

    model = build_model("gpt", torch.float64)
    unprepared = refusal(U.handle_of, model)
    wrong_config = refusal(U.parallelize_module, model, make_mesh(ctx, 1, ctx.world), "full", errors=(TypeError,))
    U.parallelize_module(model, make_mesh(ctx, 1, ctx.world))
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens)
    handle = U.handle_of(model)
    compiled = U.handle_of(torch.compile(model))  # through torch.compile's wrapper too
    return (unprepared, wrong_config, handle.sp, handle.ring_degree, handle.propagation, handle.last_attention_calls,
            handle.compiled_blocks, handle.config.fsdp, compiled.sp, repr(handle))


def test_handle_tells_what_parallelize_did(ranks4):
    unprepared, wrong_config, sp, ring, propagation, calls, compiled, fsdp, compiled_sp, text = ranks4.run(
        _rank_handle, world=2)[0]
    assert "was not prepared by ulysses_dtensor.parallelize_module" in unprepared
    assert "must be a UlyssesConfig, a ParallelStyle or a plan dict" in wrong_config
    assert (sp, ring, propagation, calls, compiled, fsdp, compiled_sp) == (2, 1, True, 2, 0, True, 2)
    assert text.startswith("UlyssesHandle(Llama, sp=2"), text


def _rank_init_mesh(ctx):
    import ulysses_dtensor as U

    errors = []
    for dp, sp in ((3, None), (2, 3)):
        try:
            U.init_mesh(dp=dp, sp=sp, device_type="cpu")
        except ValueError as exc:
            errors.append(str(exc))
    mesh = ctx._meshes.setdefault("init_mesh", U.init_mesh(dp=2, device_type="cpu"))
    return mesh.mesh_dim_names, tuple(mesh.shape), mesh["sp"].size(), errors


def test_init_mesh_builds_dp_sp_and_refuses_bad_shapes(ranks4):
    for names, shape, sp, errors in ranks4.run(_rank_init_mesh, world=4):
        assert names == ("dp", "sp") and shape == (2, 2) and sp == 2
        assert "does not divide the world size 4" in errors[0] and "does not match the world size 4" in errors[1]
