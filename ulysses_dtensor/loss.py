"""Cross-entropy as the global token-weighted mean over ranks, and its chunked form.

:func:`token_weighted_cross_entropy` takes this rank's logits. :func:`chunked_linear_cross_entropy`
takes the hidden states and the output layer instead and never holds the (T × V) logits: it runs
the output projection and the cross-entropy over tiles of ``chunk_tokens`` tokens, keeps one
log-sum-exp per token, and recomputes each tile's logits in backward. At long context the
logits are the largest tensors of a step (T = 16K tokens per GPU, V = 128K: 8 GiB of bf16
logits, twice that of fp32 log-probabilities and their gradient); chunked, one tile's are live.

Both return the same value on every rank of ``group`` (the single-process mean over all ranks'
scored tokens) and a gradient that is this rank's share, so gradients summed over the ranks
(FSDP2's reduce-scatter, or an all-reduce) are the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

Tensor = torch.Tensor

# logits of one tile: chunk_tokens × V elements in the compute dtype (fp32 for bf16 models)
DEFAULT_CHUNK_ELEMENTS = 2**26  # 256 MiB of fp32


def global_token_mean(local_sum: Tensor, count: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``sum over ranks of local_sum / sum over ranks of count`` on every rank; the gradient
    flows to this rank's ``local_sum`` only (its share)."""
    global_count = funcol.all_reduce(count.to(local_sum.dtype), "sum", group)
    share = local_sum / global_count
    total = funcol.all_reduce(share.detach(), "sum", group)
    return share + (total - share.detach())


def token_weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    group: dist.ProcessGroup,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean cross-entropy over the non-ignored tokens of *all* ranks of ``group``.

    logits: (T, V) or (B, V, ...) of this rank's tokens; target: matching class indices.
    """
    local_sum = F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    return global_token_mean(local_sum, (target != ignore_index).sum(), group)


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of ``cross_entropy(hidden @ weight.T + bias, target)``, in tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index: int, chunk: int):
        compute = torch.promote_types(hidden.dtype, torch.float32)
        valid = target != ignore_index
        safe_target = torch.where(valid, target, 0)
        lse = torch.empty(hidden.shape[0], dtype=compute, device=hidden.device)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).to(compute)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_target[rows, None]).squeeze(1)
            total = total + ((lse[rows] - picked) * valid[rows]).sum()
        ctx.save_for_backward(hidden, weight, bias, safe_target, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, safe_target, valid, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_bias else None
        scale = valid.to(compute) * grad_total.to(compute)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = (F.linear(hidden[rows], weight, bias).to(compute) - lse[rows, None]).exp_()
            probs.scatter_add_(1, safe_target[rows, None], -torch.ones_like(lse[rows, None]))
            grad_logits = (probs * scale[rows, None]).to(hidden.dtype)  # as autograd casts back
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += grad_logits.t() @ hidden[rows]
            if need_bias:
                grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _tiled_sum(hidden, weight, bias, target, ignore_index: int, chunk_tokens: int | None) -> Tensor:
    """Summed cross-entropy of this rank's tokens, in tiles (shapes checked first)."""
    if hidden.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (T, C) and target (T,), got {tuple(hidden.shape)} and {tuple(target.shape)}")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, chunk)


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    group: dist.ProcessGroup,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> Tensor:
    """``token_weighted_cross_entropy(F.linear(hidden, weight, bias), target, group)`` without
    the logits: tiles of ``chunk_tokens`` tokens (default: 2**26 logits elements per tile),
    recomputed in backward. Computed in ``promote_types(dtype, float32)``.

    hidden: (T, C) this rank's tokens; weight: (V, C); bias: (V,) or None; target: (T,).
    """
    local_sum = _tiled_sum(hidden, weight, bias, target, ignore_index, chunk_tokens)
    return global_token_mean(local_sum, (target != ignore_index).sum(), group)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight, bias)`` against ``target`` over the
    non-ignored tokens, in tiles (the logits are never held). For a model's own forward: in one
    process it is that mean; inside a parallelized forward the rewrite mode turns it into
    :func:`chunked_linear_cross_entropy` over the loss group, as it turns ``F.cross_entropy``
    into the global mean.

    hidden: (T, C); weight: (V, C); bias: (V,) or None; target: (T,).
    """
    if has_torch_function((hidden, weight, target)):  # a function mode is on: let it route the call
        return handle_torch_function(
            linear_cross_entropy, (hidden, weight, target), hidden, weight, target, bias=bias,
            ignore_index=ignore_index, chunk_tokens=chunk_tokens,
        )
    local_sum = _tiled_sum(hidden, weight, bias, target, ignore_index, chunk_tokens)
    return local_sum / (target != ignore_index).sum()
