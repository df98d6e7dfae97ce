"""F.scaled_dot_product_attention on Shard(2) DTensors: Ulysses via the DTensor rule."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import ulysses_dtensor
from helpers import TOL, make_mask, make_mesh, rel_err
from ulysses_dtensor.comm_counter import CollectiveCounter
from ulysses_dtensor.layout import UlyssesLayout


def _with_rule(rank_fn):
    """Run a rank function with the DTensor rule installed (importing the package installs nothing)."""

    @functools.wraps(rank_fn)
    def run(*args, **kwargs):
        with ulysses_dtensor.dtensor_attention_rule():
            return rank_fn(*args, **kwargs)

    return run


def _mesh(ctx, shape):
    """The ("sp",) mesh of the rank group (``shape`` None) or a (dp, sp) ``shape`` mesh, its placements."""
    if shape is None:
        return ctx.mesh("sp"), [Shard(2)]
    return make_mesh(ctx, *shape), [Shard(0), Shard(2)]


@_with_rule
def _rank_dtensor_sdpa(ctx, q, k, v, grad_out, kwargs, mesh_shape=None):
    mesh, placements = _mesh(ctx, mesh_shape)
    q, k, v = (distribute_tensor(t, mesh, placements).requires_grad_() for t in (q, k, v))
    if "attn_mask" in kwargs:
        kwargs = dict(kwargs, attn_mask=distribute_tensor(kwargs["attn_mask"], mesh, [Replicate()] * mesh.ndim))
    with CollectiveCounter() as counter:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        forward = (dict(counter.counts()), counter.bytes_sent())
        counter.reset()
        out.backward(distribute_tensor(grad_out, mesh, placements))
        backward = (dict(counter.counts()), counter.bytes_sent())
    return (
        tuple(out.placements), out.full_tensor().detach(), q.grad.full_tensor(), k.grad.full_tensor(),
        v.grad.full_tensor(), forward, backward, tuple(q.grad.placements),
    )


@st.composite
def cases(draw):
    world = draw(st.integers(1, 4))
    kv = draw(st.integers(1, 4))
    return dict(
        world=world, B=draw(st.integers(1, 2)), Hkv=kv, H=kv * draw(st.sampled_from([1, 2, 3])),
        N=draw(st.integers(world, 30)), D=draw(st.sampled_from([2, 8])),
        mask=draw(st.sampled_from(["none", "causal", "bool", "additive"])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _check(ranks4, c, mesh_shape=None):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, N, D, dtype = c["B"], c["H"], c["Hkv"], c["N"], c["D"], c["dtype"]
    q = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    kwargs = dict(enable_gqa=H != Hkv)
    if c["mask"] == "causal":
        kwargs["is_causal"] = True
    elif c["mask"] != "none":
        kwargs["attn_mask"] = make_mask(c["mask"], "B1NN", B, H, N, dtype, gen)
    world = c["world"] if mesh_shape is None else mesh_shape[0] * mesh_shape[1]
    results = ranks4.run(_rank_dtensor_sdpa, q, k, v, grad_out, kwargs, mesh_shape, world=world)

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, **kwargs)
    ref.backward(grad_out)
    placements, out, dq, dk, dv, forward, backward, grad_placements = results[0]
    expected_placements = (Shard(2),) if mesh_shape is None else (Shard(0), Shard(2))
    assert placements == expected_placements and grad_placements == expected_placements
    for name, got, want in [("out", out, ref), ("dq", dq, ref_in[0].grad), ("dk", dk, ref_in[1].grad), ("dv", dv, ref_in[2].grad)]:
        assert rel_err(got, want) <= TOL[dtype], (name, rel_err(got, want), c)
    sp = world if mesh_shape is None else mesh_shape[1]
    # Exactly one all-to-all each way per direction; never DTensor's all-gather fallback.
    # (The final full_tensor() calls run outside the counter.)
    expected = {"all_to_all": 2} if sp > 1 else {}
    B_local = B if mesh_shape is None else B // mesh_shape[0]
    layout = UlyssesLayout.build(B_local, H, Hkv, N, D, sp)
    size = torch.finfo(dtype).bits // 8
    for i, r in enumerate(results):
        sp_rank = i if mesh_shape is None else i % mesh_shape[1]
        (fwd_counts, fwd_bytes), (bwd_counts, bwd_bytes) = r[5], r[6]
        assert fwd_counts == expected and bwd_counts == expected, (r[5], r[6])
        # the minimum, as for ulysses_attention: backward moves only the output gradient in
        assert fwd_bytes == layout.forward_elements_sent(sp_rank) * size, (fwd_bytes, c)
        assert bwd_bytes == layout.backward_elements_sent(sp_rank) * size, (bwd_bytes, c)


@given(c=cases())
def test_dtensor_sdpa_is_ulysses_and_exact(ranks4, c):
    _check(ranks4, c)


@settings(max_examples=8)
@given(c=cases())
def test_dtensor_sdpa_on_dp_sp_mesh(ranks4, c):
    """(dp=2, sp=2) mesh: batch sharded over dp (local), sequence over sp (Ulysses)."""
    c["B"] = 2
    c["N"] = max(c["N"], 2)
    _check(ranks4, c, mesh_shape=(2, 2))


@_with_rule
def _rank_redistribute_shard_to_shard(ctx, x):
    d = distribute_tensor(x, ctx.mesh(), [Shard(2)])
    with CollectiveCounter() as counter:
        d.redistribute(ctx.mesh(), [Shard(1)]).to_local()
    return dict(counter.counts())


def test_counter_sees_dtensors_all_gather_fallback(ranks4):
    """The counter is able to fail the test above: DTensor's own Shard(2)->Shard(1) on CPU
    shows up as all-gather, not all-to-all."""
    counts = ranks4.run(_rank_redistribute_shard_to_shard, torch.randn(1, 8, 8, 2), world=4)
    assert all(c.get("all_gather", 0) >= 1 and "all_to_all" not in c for c in counts), counts


@_with_rule
def _rank_replicated_sdpa(ctx, q):
    d = distribute_tensor(q, ctx.mesh(), [Replicate()])
    with CollectiveCounter() as counter:
        try:
            out = F.scaled_dot_product_attention(d, d, d).full_tensor()
        except Exception as exc:  # noqa: BLE001
            out = type(exc).__name__
    return out, dict(counter.counts())


def test_inputs_without_sequence_sharding_are_left_to_dtensor(ranks4):
    q = torch.randn(1, 4, 8, 2, dtype=torch.float64)
    with_rule = ranks4.run(_rank_replicated_sdpa, q, world=2)
    assert all("all_to_all" not in r[1] for r in with_rule)
    if isinstance(with_rule[0][0], torch.Tensor):
        assert rel_err(with_rule[0][0], F.scaled_dot_product_attention(q, q, q)) <= 1e-12


def test_import_installs_nothing_and_the_context_manager_undoes_itself():
    import subprocess
    import sys

    code = (
        "import torch, ulysses_dtensor\n"
        "from torch.distributed.tensor import DTensor\n"
        "assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in "
        "DTensor._op_dispatcher._custom_op_handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from torch.distributed.tensor import DTensor

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    handlers = DTensor._op_dispatcher._custom_op_handlers
    installed = op in handlers
    with ulysses_dtensor.dtensor_attention_rule():
        assert op in handlers
        with ulysses_dtensor.dtensor_attention_rule():
            assert op in handlers
        assert op in handlers
    assert (op in handlers) == installed


def test_register_is_idempotent_and_unregister_restores():
    from torch.distributed.tensor import DTensor

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    handlers = DTensor._op_dispatcher._custom_op_handlers
    ulysses_dtensor.dtensor_rule.register()
    ulysses_dtensor.dtensor_rule.register()
    assert op in handlers
    ulysses_dtensor.dtensor_rule.unregister()
    assert op not in handlers
    ulysses_dtensor.dtensor_rule.register()
    assert op in handlers


@_with_rule
def _rank_mismatched_placements(ctx):
    mesh = ctx.mesh()
    x = torch.randn(1, 4, 8, 2)
    q = distribute_tensor(x, mesh, [Shard(2)])
    k = distribute_tensor(x, mesh, [Replicate()])
    with CollectiveCounter() as counter:
        try:
            F.scaled_dot_product_attention(q, k, q)
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, str(exc), len(counter.records)
    return None, "", len(counter.records)


def test_mismatched_placements_are_refused_before_any_collective(ranks4):
    for name, msg, collectives in ranks4.run(_rank_mismatched_placements, world=2):
        assert name == "ValueError" and "same placements" in msg and collectives == 0, (name, msg)


@_with_rule
def _rank_sum_backward(ctx, x):
    mesh = ctx.mesh()
    q = distribute_tensor(x, mesh, [Shard(2)]).requires_grad_()
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    out.sum().backward()  # the output gradient arrives replicated, not Shard(2)
    return q.grad.full_tensor()


def test_backward_from_a_replicated_output_gradient(ranks4):
    x = torch.randn(2, 4, 10, 3, dtype=torch.float64)
    ref = x.clone().requires_grad_()
    F.scaled_dot_product_attention(ref, ref, ref, is_causal=True).sum().backward()
    for grad in ranks4.run(_rank_sum_backward, x, world=3):
        assert rel_err(grad, ref.grad) <= 1e-10


@_with_rule
def _rank_backward_without_saved_heads(ctx, x, grad_out):
    mesh = ctx.mesh()
    q = distribute_tensor(x, mesh, [Shard(2)]).requires_grad_()
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    lse = out.grad_fn._saved_logsumexp._local_tensor
    del lse._ulysses_head_sharded  # as if the forward had run elsewhere: backward re-exchanges
    with CollectiveCounter() as counter:
        out.backward(distribute_tensor(grad_out, mesh, [Shard(2)]))
    return q.grad.full_tensor(), dict(counter.counts()), counter.bytes_sent()


def test_backward_fallback_without_saved_head_sharded_tensors(ranks4):
    x, grad_out = torch.randn(1, 4, 12, 3, dtype=torch.float64), torch.randn(1, 4, 12, 3, dtype=torch.float64)
    ref = x.clone().requires_grad_()
    F.scaled_dot_product_attention(ref, ref, ref, is_causal=True).backward(grad_out)
    minimum = UlyssesLayout.build(1, 4, 4, 12, 3, 2).backward_elements_sent(0) * 8
    for grad, counts, sent in ranks4.run(_rank_backward_without_saved_heads, x, grad_out, world=2):
        assert rel_err(grad, ref.grad) <= 1e-10 and counts == {"all_to_all": 2}, counts
        assert sent == 2 * minimum, (sent, minimum)  # q, k, v, out, grad in: 5 units + 3 out = 8 vs 4
