"""Shared test helpers: inputs drawn from a seed, shard slicing, relative error."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def attention_inputs(case: dict, value_dim: int | None = None):
    """(generator, q, k, v, grad_out) of a case dict (batch, num_heads, num_kv_heads, seq_len,
    head_dim, dtype, seed): global (B, H, N, D) q, (B, H_kv, N, D|Dv) k/v, (B, H, N, Dv) grad_out.
    The generator is returned so the caller can draw masks from the same stream."""
    B, H, Hkv, N, D = case["batch"], case["num_heads"], case["num_kv_heads"], case["seq_len"], case["head_dim"]
    Dv, dtype = value_dim or D, case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, dtype=dtype)
    grad_out = torch.randn(B, H, N, Dv, generator=gen, dtype=dtype)
    return gen, q, k, v, grad_out


def summed_grad_error(model: torch.nn.Module, reference: torch.nn.Module, group, floor: float = 0.0) -> float:
    """Largest relative error of ``model``'s gradients summed over ``group`` (without FSDP each
    rank holds its share) against the one-process ``reference``'s; parameter names are matched
    through checkpoint and compile wrappers. ``floor``: the smallest scale an error is relative
    to (for gradients that are zero in exact arithmetic, e.g. attention's key bias, whose
    one-process value is rounding noise); parameters without a gradient must have none in the
    reference either."""
    import torch.distributed as dist

    expected = {name: p.grad for name, p in reference.named_parameters()}
    errors = []
    for name, p in model.named_parameters():
        plain = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if p.grad is None:
            assert expected[plain] is None, f"{plain}: no gradient, but the reference has one"
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        scale = max(expected[plain].abs().max().item(), floor, 1e-30)
        errors.append((grad.double() - expected[plain].double()).abs().max().item() / scale)
    return max(errors)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor an op allocates inside the block among
    those ``select(t)`` accepts (e.g. bool: an (N, N) mask; last dim = vocab: logits)."""

    def __init__(self, select):
        super().__init__()
        self.select = select
        self.numel = 0
        self.op = None  # the op that produced it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        # outputs sharing an input's storage (views, in-place results) allocate nothing
        shared = {_storage_address(t) for t in inputs if isinstance(t, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and self.select(t) and t.numel() > self.numel
                    and _storage_address(t) not in shared):
                self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def _storage_address(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # wrapper subclasses (DTensor) have no storage of their own
        return None
