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
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from .attention import ulysses_attention
from .hybrid import hybrid_attention
from .loss import chunked_linear_cross_entropy, linear_cross_entropy, token_weighted_cross_entropy
from .propagation import SequencePropagation, from_local, local_of, replicate_plain_tensors, replicated_value

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


def running_mode() -> "UlyssesFunctionMode | None":
    """The rewrite mode of the parallelized forward running now, from torch's function-mode
    stack (Dynamo traces the lookup), or None. Attention that no mode sees (torchtitan's flex
    modules, direct ``flex_attention`` calls) and HF's local-path mask builder read it."""
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, UlyssesFunctionMode):
            return mode
    return None


def active_mode() -> "UlyssesFunctionMode":
    """:func:`running_mode`, which must exist."""
    mode = running_mode()
    if mode is None:
        raise RuntimeError("called outside the forward of a model prepared by ulysses_dtensor.parallelize_module")
    return mode


def _check_sequence_sharded(q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, DTensor) or t.placements != (Shard(2),):
            raise ValueError(
                f"parallelize_module: attention's {name} must be sequence-sharded (B, H, N, D) Shard(2) on "
                f"the sp mesh, got {getattr(t, 'placements', 'a plain tensor')}; the model's attention "
                "input layout is not (batch, heads, sequence, head_dim)"
            )


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
        head_chunks: query heads per rank processed in this many chunks (``head_chunks.py``).
    """

    def __init__(self, sp_group, seq_len: int, loss_group=None, kernel="sdpa", local_attention_only=False,
                 documents=None, ring_degree: int = 1, propagation: SequencePropagation | None = None,
                 head_chunks: int = 1):
        super().__init__()
        self.head_chunks = head_chunks
        self.propagation = propagation or SequencePropagation(None, active=False)
        self.ring_degree = ring_degree
        self.local_attention_only = local_attention_only
        self.sp_group = sp_group
        self.seq_len = seq_len
        self.loss_group = loss_group
        self.kernel = kernel
        self.documents = documents
        self.attention_calls = 0
        self.mixer_calls = 0  # other sequence mixers (mixers.py), eager
        self.document_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, options = _sdpa_arguments(*args, **kwargs)
            return self.attend(q, k, v, lambda q, k, v, **o: func(q, k, v, **o), **options)
        if func is checkpoint and torch.compiler.is_compiling():
            # Dynamo traces the checkpointed body as a higher-order op from inside this handler,
            # where this mode is off: run the body in the mode again so its attention is rewritten.
            body, *rest = args

            def body_in_rewrite(*body_args, **body_kwargs):
                with self:
                    return body(*body_args, **body_kwargs)

            return func(body_in_rewrite, *rest, **kwargs)
        if func is linear_cross_entropy and self.loss_group is not None:
            return self._linear_loss(*args, **kwargs)
        if func is F.cross_entropy and self.loss_group is not None:
            logits, target, ignore_index, label_smoothing, plain_mean = _cross_entropy_arguments(*args, **kwargs)
            if isinstance(logits, DTensor) or isinstance(target, DTensor):
                if not plain_mean:
                    raise ValueError(
                        "parallelize_module: F.cross_entropy on sequence-sharded logits needs the plain "
                        "reduction='mean' (no weight), which becomes the global token-weighted mean"
                    )
                return self._loss_on_shards(logits, target, ignore_index, label_smoothing)
            if plain_mean:
                return token_weighted_cross_entropy(
                    logits, target, self.loss_group, ignore_index=ignore_index, label_smoothing=label_smoothing
                )
        if self.propagation.active:
            replicated = replicate_plain_tensors(args, kwargs)
            if replicated is not None:
                args, kwargs = replicated
        return func(*args, **kwargs)

    def attend(self, q, k, v, local_kernel, *, kernel=None, uses_documents=True, **options):
        """The one place an attention call of a parallelized forward becomes Ulysses attention:
        SDPA calls (above), direct ``flex_attention`` calls (``flex.py``) and torchtitan's flex
        modules (``titan.py``) all come here.

        q: (B, H, N_r, D) plain local shards, or (B, H, N, D) DTensors placed ``Shard(2)`` (the
        propagation path: the output is ``Shard(2)`` too); k, v likewise. ``local_kernel(q, k, v,
        **options)`` is the call's own kernel, run on the local tokens only for
        ``local_attention_only``. ``kernel``: the local kernel of the exchange (default: the
        configured one); ``uses_documents``: whether packed documents apply to this kernel (flex
        calls carry their own BlockMask: not counted as document calls, which the parallelized
        forward then refuses).
        """
        sharded = isinstance(q, DTensor)
        if sharded:
            _check_sequence_sharded(q, k, v)
            mask = options.get("attn_mask")
            if isinstance(mask, DTensor):
                if any(not p.is_replicate() for p in mask.placements):
                    raise ValueError(
                        f"parallelize_module: attn_mask placed {mask.placements}: a mask must be of the global "
                        "sequence on every rank (built from positions or a plain (B, N) attention_mask)"
                    )
                options["attn_mask"] = mask.to_local()
            q_global, q, k, v = q, local_of(q), local_of(k), local_of(v)
        with_documents = uses_documents and self.documents is not None
        if not torch.compiler.is_compiling():  # no Python side effects in graphs (recompiles, checkpoints)
            self.attention_calls += 1
            self.document_calls += with_documents
        if self.local_attention_only:
            out = local_kernel(q, k, v, **{**options, "attn_mask": None} if sharded else options)
        else:
            if with_documents:
                options["documents"] = self.documents
            with self.propagation.allowed():
                if self.ring_degree > 1 and kernel is None:
                    out = hybrid_attention(q, k, v, self.sp_group, ring_degree=self.ring_degree, seq_len=self.seq_len, **options)
                else:
                    if self.head_chunks > 1 and torch.compiler.is_compiling():
                        raise NotImplementedError(
                            f"UlyssesConfig(head_chunks={self.head_chunks}) runs eagerly only: its recomputing "
                            "backward is an autograd.Function torch.compile does not trace; use head_chunks=1 "
                            "with torch.compile"
                        )
                    out = ulysses_attention(q, k, v, self.sp_group, seq_len=self.seq_len, kernel=kernel or self.kernel,
                                            head_chunks=self.head_chunks, **options)
        if sharded:
            return from_local(out, q_global, torch.Size((*q_global.shape[:3], out.shape[3])))
        return out

    def _linear_loss(self, hidden, weight, target, *, bias=None, ignore_index=-100, chunk_tokens=None):
        """:func:`~ulysses_dtensor.loss.linear_cross_entropy` of this rank's tokens as the global
        token-weighted mean (a ``Replicate`` DTensor on the propagation path)."""
        if isinstance(hidden, DTensor) != isinstance(target, DTensor) or (
            isinstance(hidden, DTensor) and hidden.placements != target.placements
        ):
            raise ValueError(
                "parallelize_module: linear_cross_entropy got hidden states placed "
                f"{getattr(hidden, 'placements', 'plain')} and targets {getattr(target, 'placements', 'plain')}; "
                "both must be sequence-sharded alike"
            )
        with self.propagation.allowed():
            loss = chunked_linear_cross_entropy(
                local_of(hidden), weight, local_of(target), self.loss_group, bias=bias,
                ignore_index=ignore_index, chunk_tokens=chunk_tokens,
            )
        if not isinstance(hidden, DTensor):
            return loss
        return replicated_value(loss, hidden.device_mesh)

    def _loss_on_shards(self, logits, target, ignore_index, label_smoothing):
        """Mean cross-entropy of sharded logits/targets (token rows matched by placement) as the
        global token-weighted mean: a ``Replicate`` DTensor scalar."""
        if not (isinstance(logits, DTensor) and isinstance(target, DTensor)) or logits.placements != target.placements:
            raise ValueError(
                "parallelize_module: F.cross_entropy got logits placed "
                f"{getattr(logits, 'placements', 'plain')} and targets {getattr(target, 'placements', 'plain')}; "
                "both must be sequence-sharded alike (compute the loss from the model's own outputs and "
                "the labels passed to the forward)"
            )
        group = self.loss_group if self.loss_group is not None else self.sp_group
        with self.propagation.allowed():
            loss = token_weighted_cross_entropy(
                local_of(logits), target.to_local(), group, ignore_index=ignore_index, label_smoothing=label_smoothing
            )
        return replicated_value(loss, logits.device_mesh)
