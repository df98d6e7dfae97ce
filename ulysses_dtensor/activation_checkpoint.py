"""Activation checkpointing of the transformer blocks, with a Ulysses-aware selective mode.

``UlyssesConfig(activation_checkpointing=...)``, the planner's ``--activation-checkpointing``:

* ``"full"``: each block keeps only its input; backward recomputes the block, its all-to-alls
  included (one more forward exchange per layer, like torchtitan's full AC).
* ``"selective"``: backward recomputes the block but reuses what the forward got from every
  all-to-all and from the attention kernel (torch's selective activation checkpointing, with a
  policy that saves exactly those ops): no collective and no attention kernel runs twice; norms,
  projections, the exchange's copies and the MLP are recomputed. Kept per layer: the block
  input, the received q/k/v, the kernel's output and logsumexp, and the output received back.

* ``"offload"``: like ``"full"``, with each kept block input in host memory from forward to
  backward (``offload.py``; eager only).

``"selective"`` and ``"full"`` wrap each block in torch's ``checkpoint_wrapper`` (non-reentrant),
so they work eagerly and under ``torch.compile`` (whole model or per block), and FSDP2 shards the
wrapped blocks; ``"offload"`` replaces the block's forward (same module, same state-dict names).

Recompute inside the rewrite (:func:`reenter_rewrite_on_recompute`, for our modes and for the
checkpointing a model does itself): ``parallelize_module`` rewrites attention while the model's forward runs (a TorchFunctionMode).
Activation checkpointing (torch's ``checkpoint``/``checkpoint_wrapper``, torchtitan's, Hugging
Face's ``gradient_checkpointing_enable()``) recomputes a block during backward, outside that
mode, where attention would see only this rank's tokens (torch then fails with
``CheckpointError``, or worse). Each block remembers the mode of its last forward and enters it
again when it runs inside the autograd engine, i.e. when it is recomputed. The block's children
are wrapped too: Hugging Face checkpoints inside the class's forward, so its recompute calls the
class function and reaches our wrapper only at the children (the attention module among them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .offload import offload_block_inputs
from .rewrite import running_mode

MODES = ("none", "selective", "full", "offload")


def _saved_ops() -> frozenset:
    """The ops whose outputs the selective mode keeps: the all-to-all (Ulysses exchanges and ring
    hops) and the fused attention kernels SDPA dispatches to on CPU and CUDA."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    ops.add(torch.ops._c10d_functional.all_to_all_single.default)
    return frozenset(ops)


SAVED_OPS = _saved_ops()


def save_exchanges_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep all-to-all and attention-kernel outputs, recompute
    everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """``context_fn`` for ``torch.utils.checkpoint`` with :func:`save_exchanges_and_attention`."""
    return create_selective_checkpoint_contexts(save_exchanges_and_attention)


def check_mode(mode: str, model: nn.Module) -> None:
    """A known mode, and no checkpointing the model already does itself (it would nest)."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: choose one of {MODES}")
    # transformers names it is_activation_checkpointing (is_gradient_checkpointing is deprecated)
    hf_checkpointing = getattr(model, "is_activation_checkpointing", None)
    if hf_checkpointing is None:
        hf_checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if mode != "none" and hf_checkpointing:
        raise ValueError(
            f"activation_checkpointing={mode!r} on a model with Hugging Face gradient checkpointing "
            "enabled: use one of the two (model.gradient_checkpointing_disable())"
        )


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module], mode: str) -> list[nn.Module]:
    """Wrap each of ``blocks`` (submodules of ``model``) in ``checkpoint_wrapper`` for ``mode``;
    returns the blocks as they now sit in the model (the wrappers, or ``blocks`` for "none")."""
    check_mode(mode, model)
    if mode == "none":
        return blocks
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    if any(isinstance(b, CheckpointWrapper) for b in blocks):
        raise ValueError(
            f"activation_checkpointing={mode!r}: the model's blocks are already checkpoint-wrapped; "
            "leave activation_checkpointing='none' to keep your own"
        )
    if not blocks:
        raise ValueError(f"activation_checkpointing={mode!r}: no transformer blocks found (set block_classes)")
    if mode == "offload":
        for block in blocks:
            offload_block_inputs(block)
        return blocks
    wanted = {id(b) for b in blocks}
    options = {"context_fn": selective_context} if mode == "selective" else {}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, **options),
        check_fn=lambda m: id(m) in wanted,
    )
    wrapper_of = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [wrapper_of[id(b)] for b in blocks]

def _inner(block: nn.Module) -> nn.Module:
    """The module a checkpoint wrapper recomputes (torch's CheckpointWrapper keeps it here)."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def reenter_rewrite_on_recompute(blocks: list[nn.Module]) -> None:
    """Wrap the forward of each block and of its children so that a recompute during backward
    runs in the mode of the forward it repeats.

    Limit: the mode remembered is the block's last forward's, so several forwards of different
    sequence lengths before one backward (with checkpointing) are not supported."""
    modules = []
    for block in map(_inner, blocks):
        modules += [block, *block.children()]
    for module in modules:
        forward = module.forward
        remembered: dict = {}

        def forward_in_rewrite(*args, _forward=forward, _remembered=remembered, **kwargs):
            if torch.compiler.is_compiling():
                # a compiled checkpoint recomputes from its graph, which holds the rewrite already
                return _forward(*args, **kwargs)
            mode = running_mode()
            if mode is not None:  # the forward itself
                _remembered["mode"] = mode
                return _forward(*args, **kwargs)
            if "mode" not in _remembered or torch._C._current_graph_task_id() == -1:
                return _forward(*args, **kwargs)  # not a recompute (or never ran under the rewrite)
            with _remembered["mode"]:
                return _forward(*args, **kwargs)

        module.forward = forward_in_rewrite
