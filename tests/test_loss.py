"""chunked_linear_cross_entropy (loss.py) vs token_weighted_cross_entropy of the full logits,
across real gloo ranks: the value on every rank and every gradient summed over ranks equal the
single-process mean cross-entropy, whatever the tiling and however ignored tokens are spread."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TOL, rel_err


def _rank_chunked_loss(ctx, hidden, weight, bias, target, chunk):
    import torch.distributed as dist

    from ulysses_dtensor.loss import chunked_linear_cross_entropy

    rows = torch.tensor_split(torch.arange(hidden.shape[0]), ctx.world)[ctx.rank]
    h = hidden[rows].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, target[rows], ctx.group, bias=b, chunk_tokens=chunk)
    loss.backward()
    grads = [w.grad] + ([] if b is None else [b.grad])
    for g in grads:  # each rank holds its share: the sum is the gradient
        dist.all_reduce(g, group=ctx.group)
    return loss.detach(), h.grad, grads


@settings(max_examples=25)
@given(
    world=st.integers(1, 4), per_rank=st.integers(1, 9), C=st.integers(1, 12), V=st.integers(2, 40),
    chunk=st.integers(1, 11), ignored=st.floats(0.0, 0.9), with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16),
)
def test_chunked_loss_equals_full_logits_cross_entropy(ranks4, world, per_rank, C, V, chunk, ignored, with_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    T = world * per_rank - int(torch.randint(0, per_rank, (1,), generator=gen))  # uneven shards
    hidden = torch.randn(T, C, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, C, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, generator=gen, dtype=dtype, requires_grad=True) if with_bias else None
    target = torch.randint(0, V, (T,), generator=gen)
    target[: int(T * ignored)] = -100  # ignored tokens crowd the first ranks
    if (target == -100).all():
        target[-1] = 0
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=-100)
    ref.backward()
    rows = torch.tensor_split(torch.arange(T), world)
    for rank, (loss, h_grad, grads) in enumerate(ranks4.run(_rank_chunked_loss, hidden.detach(), weight.detach(),
                                                           None if bias is None else bias.detach(), target, chunk,
                                                           world=world)):
        assert rel_err(loss, ref) <= TOL[dtype], f"rank {rank}"
        assert rel_err(h_grad, hidden.grad[rows[rank]]) <= TOL[dtype]
        assert rel_err(grads[0], weight.grad) <= TOL[dtype]
        if bias is not None:
            assert rel_err(grads[1], bias.grad) <= TOL[dtype]


def test_chunked_loss_refuses_mismatched_shapes():
    import pytest

    from ulysses_dtensor.loss import chunked_linear_cross_entropy

    with pytest.raises(ValueError, match=r"hidden must be \(T, C\)"):
        chunked_linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long), None)


def _rank_llama_chunked_loss(ctx, propagation: bool, N: int):
    import copy
    from dataclasses import replace

    import ulysses_dtensor as U
    from helpers import summed_grad_error
    from ulysses_dtensor.tools.llama import Llama, llama_config

    torch.manual_seed(0)
    ref = Llama(llama_config("tiny", vocab_size=50, max_seq_len=64)).double()
    model = copy.deepcopy(ref)
    model.cfg = replace(model.cfg, chunked_loss=True)
    U.parallelize_module(model, ctx.mesh(), U.UlyssesConfig(fsdp=False, propagation=propagation))
    gen = torch.Generator().manual_seed(N)
    tokens, targets = (torch.randint(0, 50, (2, N), generator=gen) for _ in range(2))
    targets[0, : N // 2] = -100  # ignored tokens on the first ranks only
    _, ref_loss = ref(tokens, targets)
    ref_loss.backward()
    logits, loss = model(tokens, targets)
    loss.backward()
    return logits is None, rel_err(loss, ref_loss), summed_grad_error(model, ref, ctx.group)


def test_llama_chunked_loss_equals_one_process(ranks4):
    """``LlamaConfig(chunked_loss=True)``: ``linear_cross_entropy`` is routed to the global
    chunked loss on both paths; float64 loss and every gradient equal one process's."""
    for propagation in (True, False):
        for sp, N in ((2, 19), (4, 30)):
            for rank, (no_logits, loss_err, grad_err) in enumerate(
                ranks4.run(_rank_llama_chunked_loss, propagation, N, world=sp)
            ):
                assert no_logits and loss_err <= 1e-10 and grad_err <= 1e-10, (propagation, sp, rank, loss_err, grad_err)


def test_linear_cross_entropy_in_one_process_is_the_mean():
    from ulysses_dtensor.loss import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (13,), generator=gen)
    t[:4] = -100
    assert rel_err(linear_cross_entropy(h, w, t, chunk_tokens=3), F.cross_entropy(h @ w.T, t)) <= 1e-12
