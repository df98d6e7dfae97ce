"""Rewrite attention and loss calls of an unmodified model while its forward runs.

:class:`UlyssesFunctionMode` is a ``TorchFunctionMode`` entered around the model's forward:

* ``F.scaled_dot_product_attention`` on this rank's tokens becomes :func:`ulysses_attention`
  over the sequence-parallel group (any model calling SDPA, Hugging Face's "sdpa" attention
  included), or the Ulysses × ring hybrid when the sp degree exceeds the heads (``ring_degree``)
  — within each document when the forward's batch is packed (``documents``);
* ``F.cross_entropy(..., reduction="mean")`` becomes the *global* token-weighted mean over the
  loss group: every rank's value is the single-process loss on the whole batch, and each rank's
  gradient path carries its own tokens' share, so summing gradients over ranks (FSDP with a
  divide factor of 1) gives the single-process gradient.

torch.compile traces through the mode (fullgraph included), so the same rewrite serves eager
and compiled models; under compile, activation-checkpointed bodies re-enter the mode (Dynamo
traces them from inside this mode's handler, where the mode is off).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .attention import ulysses_attention
from .hybrid import hybrid_attention

def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's arguments by name (plain Python binding: traceable)."""
    return query, key, value, dict(
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _cross_entropy_arguments(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                             reduction="mean", label_smoothing=0.0):
    """F.cross_entropy's arguments by name, and whether it is a plain mean we can make global."""
    plain_mean = reduction == "mean" and weight is None and size_average is None and reduce is None
    return input, target, ignore_index, label_smoothing, plain_mean


def token_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored tokens of *all* ranks of ``group``.

    logits: (T, V) or (B, V, ...) of this rank's tokens; target: matching class indices.
    The value is the global mean on every rank; the gradient is this rank's share
    ``∂(local_sum / global_count)``, so gradients summed over ranks equal the single-process one.
    """
    local_sum = F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    count = (target != ignore_index).sum().to(local_sum.dtype)
    global_count = funcol.all_reduce(count, "sum", group)
    share = local_sum / global_count
    total = funcol.all_reduce(share.detach(), "sum", group)
    return share + (total - share.detach())


# The mode of the parallelized forward running now. Attention modules that do not call SDPA
# (torchtitan's flex module, HF's mask builder) read the sequence-parallel context from it.
current: dict[str, "UlyssesFunctionMode"] = {}


def active_mode() -> "UlyssesFunctionMode":
    mode = current.get("mode")
    if mode is None:
        raise RuntimeError("called outside the forward of a model prepared by ulysses_dtensor.parallelize_module")
    return mode


class UlyssesFunctionMode(TorchFunctionMode):
    """Route attention to Ulysses and mean losses to the global mean, inside a forward.

    Args:
        sp_group: the sequence-parallel group (attention).
        seq_len: the global sequence length of this forward.
        loss_group: the group a loss mean spans (all dp × sp ranks), or None to leave losses.
        kernel: local attention kernel for :func:`ulysses_attention`.
        local_attention_only: leave attention on each rank's own tokens (an ablation: wrong for
            training, it shows what the model loses without attention across shards).
        documents: packed documents of the global sequence (``documents.Documents``): every SDPA
            call attends within documents only. ``document_calls`` counts the calls that did.
        ring_degree: R > 1 runs SDPA calls as the hybrid U-way Ulysses × R-way ring
            (``hybrid.hybrid_attention``; its own kernel, so ``kernel`` is unused there).
    """

    def __init__(self, sp_group, seq_len: int, loss_group=None, kernel="sdpa", local_attention_only=False,
                 documents=None, ring_degree: int = 1):
        super().__init__()
        self.ring_degree = ring_degree
        self.local_attention_only = local_attention_only
        self.sp_group = sp_group
        self.seq_len = seq_len
        self.loss_group = loss_group
        self.kernel = kernel
        self.documents = documents
        self.attention_calls = 0
        self.document_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, options = _sdpa_arguments(*args, **kwargs)
            if not torch.compiler.is_compiling():  # no Python side effects in graphs (recompiles, checkpoints)
                self.attention_calls += 1
                self.document_calls += self.documents is not None
            if self.local_attention_only:
                return func(*args, **kwargs)
            if self.documents is not None:
                options["documents"] = self.documents
            if self.ring_degree > 1:
                return hybrid_attention(q, k, v, self.sp_group, ring_degree=self.ring_degree, seq_len=self.seq_len, **options)
            return ulysses_attention(q, k, v, self.sp_group, seq_len=self.seq_len, kernel=self.kernel, **options)
        if func is checkpoint and torch.compiler.is_compiling():
            # Dynamo traces the checkpointed body as a higher-order op from inside this handler,
            # where this mode is off: run the body in the mode again so its attention is rewritten.
            body, *rest = args

            def body_in_rewrite(*body_args, **body_kwargs):
                with self:
                    return body(*body_args, **body_kwargs)

            return func(body_in_rewrite, *rest, **kwargs)
        if func is F.cross_entropy and self.loss_group is not None:
            logits, target, ignore_index, label_smoothing, plain_mean = _cross_entropy_arguments(*args, **kwargs)
            if plain_mean:
                return token_weighted_cross_entropy(
                    logits, target, self.loss_group, ignore_index=ignore_index, label_smoothing=label_smoothing
                )
        return func(*args, **kwargs)
