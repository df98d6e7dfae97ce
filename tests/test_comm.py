"""seq_to_head / head_to_seq: exact layouts, bit-exact round trip, uneven splits, compile."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import seq_slice
from ulysses_dtensor.comm import head_to_seq, seq_to_head
from ulysses_dtensor.comm_counter import CollectiveCounter
from ulysses_dtensor.layout import head_ranges


def _rank_round_trip(ctx, x):
    local = seq_slice(x, ctx.rank, ctx.world)
    with CollectiveCounter() as counter:
        heads = seq_to_head(local, ctx.group, seq_len=x.shape[2])
        back = head_to_seq(heads, ctx.group, num_heads=x.shape[1])
    return heads, back, local, dict(counter.counts())


@given(
    world=st.integers(1, 4), B=st.integers(1, 3), H=st.integers(1, 9), extra=st.integers(0, 13),
    D=st.integers(1, 5), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_round_trip_is_bit_exact_and_layout_is_right(ranks4, world, B, H, extra, D, dtype):
    N = world + extra
    x = torch.randn(B, H, N, D).to(dtype)
    results = ranks4.run(_rank_round_trip, x, world=world)
    for rank, (heads, back, local, counts) in enumerate(results):
        start, stop = head_ranges(H, world)[rank]
        assert torch.equal(heads, x[:, start:stop]), "seq_to_head must give every token of this rank's heads"
        assert torch.equal(back, local), "head_to_seq(seq_to_head(x)) must be x, bit for bit"
        assert counts == ({"all_to_all": 2} if world > 1 else {})


def _rank_seq_to_head_grad(ctx, x, grad):
    local = seq_slice(x, ctx.rank, ctx.world).clone().requires_grad_()
    heads = seq_to_head(local, ctx.group, seq_len=x.shape[2])
    start, stop = head_ranges(x.shape[1], ctx.world)[ctx.rank]
    heads.backward(grad[:, start:stop])
    return local.grad


def test_backward_is_the_inverse_exchange(ranks4):
    x, grad = torch.randn(2, 5, 11, 3), torch.randn(2, 5, 11, 3)
    grads = ranks4.run(_rank_seq_to_head_grad, x, grad, world=3)
    assert torch.equal(torch.cat(grads, dim=2), grad)


def _rank_compiled_attention(ctx, q, k, v, backend):
    import torch._dynamo

    from ulysses_dtensor import ulysses_attention

    torch._dynamo.reset()

    def step(q, k, v):
        return ulysses_attention(q, k, v, ctx.group, is_causal=True, enable_gqa=True, seq_len=q_len)

    q_len = q.shape[2]
    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world).clone().requires_grad_() for t in (q, k, v))
    eager = step(ql, kl, vl)
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in (ql, kl, vl)]
    for t in (ql, kl, vl):
        t.grad = None
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    out = compiled(ql, kl, vl)
    out.sum().backward()
    diffs = [(out - eager).abs().max().item()] + [(t.grad - g).abs().max().item() for t, g in zip((ql, kl, vl), eager_grads)]
    return diffs


def test_ulysses_attention_compiles_fullgraph(ranks4):
    """torch.compile(fullgraph=True) traces the exchange (functional collectives), fwd + bwd."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 24, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 24, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    for backend in ("aot_eager", "inductor"):
        diffs = ranks4.run(_rank_compiled_attention, q, k, v, backend, world=4, timeout_s=600)
        assert max(max(d) for d in diffs) <= 1e-12, (backend, diffs)
