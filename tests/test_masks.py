"""CausalMask (masks.py): the structured kernel equals SDPA with the dense mask, forward and
backward, over shapes, windows, padding patterns and tiles; misuse is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TOL, rel_err
from ulysses_dtensor.masks import CausalMask, sdpa_causal_mask


def _padding(kind: str, B: int, N: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    pad = torch.ones(B, N, dtype=torch.bool)
    cut = int(torch.randint(0, N + 1, (1,), generator=gen))
    if kind == "left":
        pad[-1, :cut] = False
    elif kind == "right":
        pad[0, cut:] = False
    else:  # holes: only with a window (tiles take any padding)
        pad[0, torch.randint(0, N, (max(1, N // 4),), generator=gen)] = False
    return pad


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), H_kv=st.integers(1, 3), group=st.integers(1, 3), N=st.integers(1, 40),
    D=st.sampled_from([4, 8]), window=st.one_of(st.none(), st.integers(1, 45)),
    padding=st.sampled_from(["none", "left", "right", "holes"]), tile=st.integers(1, 17),
    dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16),
)
def test_structured_kernel_equals_dense_sdpa(B, H_kv, group, N, D, window, padding, tile, dtype, seed):
    if padding == "holes" and window is None:
        padding = "left"
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv * group, N, D, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H_kv, N, D, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_kv, N, D, generator=gen, dtype=dtype, requires_grad=True)
    mask = CausalMask(B, N, window, _padding(padding, B, N, gen), tile=tile)
    grad = torch.randn(B, H_kv * group, N, D, generator=gen, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = sdpa_causal_mask(q, k, v, mask, scale=None, enable_gqa=True, dropout_p=0.0)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert rel_err(out, ref) <= TOL[dtype]
    for name, g, r in zip("qkv", grads, ref_grads):
        # floor: with window 1 the q gradient is zero exactly (rounding noise in the dense path)
        assert (g - r).abs().max() <= TOL[dtype] * max(1.0, r.abs().max().item()), name


def test_causal_mask_is_refused_outside_a_parallelized_forward():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="CausalMask.*outside a parallelized forward"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=CausalMask(1, 8, window=3))


def test_padding_with_holes_needs_a_window():
    pad = torch.ones(1, 8, dtype=torch.bool)
    pad[0, 3] = False
    with pytest.raises(ValueError, match="one run"):
        CausalMask(1, 8, key_padding=pad)
    CausalMask(1, 8, window=4, key_padding=pad)  # tiles take any padding
