"""Activation checkpointing inside the Ulysses rewrite.

``parallelize_module`` rewrites attention while the model's forward runs (a TorchFunctionMode).
Activation checkpointing (torch's ``checkpoint``/``checkpoint_wrapper``, torchtitan's, Hugging
Face's ``gradient_checkpointing_enable()``) recomputes a block during backward, outside that
mode, where attention would see only this rank's tokens (torch then fails with
``CheckpointError``, or worse). Each block remembers the mode of its last forward and enters it
again when it runs inside the autograd engine, i.e. when it is recomputed. The block's children
are wrapped too: Hugging Face checkpoints inside the class's forward, so its recompute calls the
class function and reaches our wrapper only at the children (the attention module among them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .rewrite import running_mode


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
