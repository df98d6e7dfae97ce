"""ulysses_attention on real gloo ranks vs single-process SDPA: forward, backward, bytes, collectives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_out_and_grads_match, attention_inputs, make_mask, rank_attention, rel_err, seq_slice
from ulysses_dtensor import ulysses_attention
from ulysses_dtensor.layout import UlyssesLayout
from ulysses_dtensor.head_chunks import chunk_head_ranges
from ulysses_dtensor.kernels import flash_attn_available
from ulysses_dtensor.tools.rank_group import RankFailure


@st.composite
def attention_cases(draw):
    world = draw(st.integers(1, 4))
    num_kv_heads = draw(st.integers(1, 4))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 3, 4]))
    seq_len = draw(st.integers(world, 40))
    mask = draw(st.sampled_from(["none", "causal", "bool", "additive"]))
    mask_shape = draw(st.sampled_from(["NN", "11NN", "B1NN", "BHNN", "HNN"]))
    return dict(
        world=world, batch=draw(st.integers(1, 2)), num_heads=num_heads, num_kv_heads=num_kv_heads,
        seq_len=seq_len, head_dim=draw(st.sampled_from([1, 4, 8, 16])), mask=mask,
        mask_shape=mask_shape, dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_case(ranks4, case, value_dim=None, head_chunks=1):
    B, H, Hkv, N, D = case["batch"], case["num_heads"], case["num_kv_heads"], case["seq_len"], case["head_dim"]
    Dv = value_dim or D
    dtype, world = case["dtype"], case["world"]
    gen, q, k, v, grad_out = attention_inputs(case, value_dim)
    kwargs = dict(enable_gqa=Hkv != H)
    if case["mask"] == "causal":
        kwargs["is_causal"] = True
    elif case["mask"] != "none":
        kwargs["attn_mask"] = make_mask(case["mask"], case["mask_shape"], B, H, N, dtype, gen)

    chunks = dict(head_chunks=head_chunks) if head_chunks > 1 else {}
    results = ranks4.run(rank_attention, q, k, v, grad_out, kwargs | chunks, world=world)

    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_inputs, **kwargs)
    assert_out_and_grads_match(results, ref, ref_inputs, grad_out, dtype, case)

    layout = UlyssesLayout.build(B, H, Hkv, N, D, world, Dv)
    size = torch.finfo(dtype).bits // 8
    for rank, r in enumerate(results):
        (fwd_counts, fwd_bytes), (bwd_counts, bwd_bytes) = r[4], r[5]
        chunks = len(chunk_head_ranges(layout.q_ranges, head_chunks))  # at most the heads a rank holds
        expected_counts = {"all_to_all": 2 * chunks} if world > 1 else {}
        assert fwd_counts == expected_counts and bwd_counts == expected_counts, (fwd_counts, bwd_counts)
        assert fwd_bytes == layout.forward_elements_sent(rank) * size, (rank, fwd_bytes)
        backward = layout.head_chunked_backward_elements_sent if head_chunks > 1 else layout.backward_elements_sent
        assert bwd_bytes == backward(rank) * size, (rank, bwd_bytes)


@given(case=attention_cases())
def test_matches_single_process_forward_and_backward(ranks4, case):
    check_case(ranks4, case)


@settings(max_examples=40)
@given(case=attention_cases(), head_chunks=st.integers(2, 4))
def test_head_chunks_match_single_process(ranks4, case, head_chunks):
    """head_chunks > 1: same output and gradients; forward bytes of plain Ulysses, backward also
    re-sends q/k/v; 2 collectives per chunk each way."""
    check_case(ranks4, case, head_chunks=head_chunks)


def test_head_chunks_refuse_dropout(ranks4):
    q = torch.randn(1, 4, 8, 4)
    with pytest.raises(RankFailure, match="ValueError: head_chunks=2 with dropout_p=0.1: the chunked backward recomputes the kernel"):
        ranks4.run(rank_attention, q, q, q, q, dict(head_chunks=2, dropout_p=0.1), world=2)


@settings(max_examples=10)
@given(case=attention_cases(), value_dim=st.sampled_from([2, 12]))
def test_value_head_dim_may_differ(ranks4, case, value_dim):
    case["mask"] = "causal"  # CPU SDPA takes Dv != D without masks' extra constraints
    check_case(ranks4, case, value_dim=value_dim)


@pytest.mark.parametrize(
    "B,H,Hkv,N,D,P",
    [(2, 8, 8, 64, 16, 4), (1, 8, 2, 32, 8, 4), (2, 16, 4, 48, 8, 4), (1, 4, 1, 12, 4, 2), (1, 12, 6, 36, 4, 3)],
)
def test_bytes_equal_closed_form_minimum(ranks4, B, H, Hkv, N, D, P):
    """(P-1)/P^2 * B*N*D*(2H + 2*max(H_kv, P)) elements per rank per forward, counted."""
    case = dict(world=P, batch=B, num_heads=H, num_kv_heads=Hkv, seq_len=N, head_dim=D,
                mask="causal", mask_shape="NN", dtype=torch.float64, seed=1)
    check_case(ranks4, case)  # counted bytes == layout formula, per rank, fwd and bwd
    closed_form = (P - 1) * B * N * D * (2 * H + 2 * max(Hkv, P)) // P**2
    layout = UlyssesLayout.build(B, H, Hkv, N, D, P)
    assert all(layout.forward_elements_sent(r) == closed_form for r in range(P))
    assert all(layout.backward_elements_sent(r) == closed_form for r in range(P))


def _rank_flex(ctx, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask

    N = q.shape[2]
    block_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 5), None, None, N, N, device="cpu")
    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world) for t in (q, k, v))
    return ulysses_attention(ql, kl, vl, ctx.group, seq_len=N, attn_mask=block_mask, kernel="flex", enable_gqa=True)


@pytest.mark.parametrize("N,P", [(32, 4), (37, 3)])
def test_flex_kernel_forward_matches(ranks4, N, P):
    """flex_attention with a global BlockMask (forward only: torch has no flex backward on CPU)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, N, 8, generator=gen) for h in (4, 2, 2))
    out = torch.cat(ranks4.run(_rank_flex, q, k, v, world=P), dim=2)
    i = torch.arange(N)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed (needs CUDA)")
def test_flash_kernel_matches():  # pragma: no cover - runs only where flash-attn imports
    from ulysses_dtensor.kernels import flash_kernel

    q, k, v = (torch.randn(1, 4, 64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = flash_kernel(q, k, v, attn_mask=None, is_causal=True, scale=None, enable_gqa=False, dropout_p=0.0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, ref) <= 2e-2


def _rank_callable_kernel(ctx, q, k, v):
    calls = []

    def my_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=enable_gqa)

    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world) for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, ctx.group, is_causal=True, kernel=my_kernel)
    return out, calls


def test_custom_kernel_sees_full_sequence_for_its_heads(ranks4):
    q, k, v = (torch.randn(2, 8, 16, 4, dtype=torch.float64) for _ in range(3))
    results = ranks4.run(_rank_callable_kernel, q, k, v, world=4)
    assert [r[1] for r in results] == [[(2, 2, 16, 4)]] * 4
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(torch.cat([r[0] for r in results], 2), ref) <= 1e-12
