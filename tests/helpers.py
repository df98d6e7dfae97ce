"""Shared test helpers: inputs drawn from a seed, shard slicing, relative error."""

from __future__ import annotations

import torch

from ulysses_dtensor.inputs import local_slice

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def seq_slice(t: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """This rank's sequence shard of a global (B, H, N, D) tensor (DTensor Shard layout)."""
    return local_slice(t, rank, world, t.shape[dim], dim)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(|expected|, tiny)."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale.double()).item()


def make_mask(kind: str, shape_kind: str, B: int, H: int, N: int, dtype, gen: torch.Generator):
    """A global attention mask: bool (diagonal always allowed, so no row is empty) or additive."""
    shapes = {
        "NN": (N, N),
        "11NN": (1, 1, N, N),
        "B1NN": (B, 1, N, N),
        "BHNN": (B, H, N, N),
        "HNN": (H, N, N),
    }
    shape = shapes[shape_kind]
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
        return mask | torch.eye(N, dtype=torch.bool)
    if kind == "additive":
        return torch.randn(shape, generator=gen, dtype=dtype)
    raise ValueError(kind)


def assert_out_and_grads_match(results, ref: torch.Tensor, ref_inputs, grad_out: torch.Tensor, dtype, context) -> None:
    """Each rank's (out, dq, dk, dv, ...) shards, concatenated along the sequence, equal the
    single-process ``ref`` computed from ``ref_inputs`` (q, k, v) and its gradients for ``grad_out``."""
    ref.backward(grad_out)
    expected = [ref.detach()] + [t.grad for t in ref_inputs]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        got = torch.cat([r[i] for r in results], dim=2)
        err = rel_err(got, expected[i])
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g} for {context}"
