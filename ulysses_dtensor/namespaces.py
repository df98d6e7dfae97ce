"""Names a model's code looks up in its own modules, rebound for the duration of a forward.

Model code calls some functions by the name its module imported (``flex_attention``,
Hugging Face's ``create_causal_mask`` and ``load_balancing_loss_func``), which no function mode
sees. :func:`rebound` replaces such a name in the modules defining the model's classes and puts
the original back afterwards, so nothing outside a parallelized forward changes.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType
from typing import Callable, Iterator

import torch.nn as nn


def model_namespaces(model: nn.Module) -> list[ModuleType]:
    """The (non-torch) Python modules defining the classes of ``model``'s modules."""
    names = sorted({type(m).__module__ for m in model.modules()})
    return [sys.modules[n] for n in names if n in sys.modules and not n.startswith("torch.")]


@contextlib.contextmanager
def rebound(namespaces: list[ModuleType], replacements: dict[str, Callable[[Callable], Callable]]) -> Iterator[None]:
    """Within the block, ``namespace.name`` is ``make(original)`` for every ``name: make`` of
    ``replacements`` a namespace defines; restored on exit."""
    saved = []
    for namespace in namespaces:
        for name, make in replacements.items():
            original = vars(namespace).get(name)
            if original is not None:
                saved.append((namespace, name, original))
                setattr(namespace, name, make(original))
    try:
        yield
    finally:
        for namespace, name, original in reversed(saved):
            setattr(namespace, name, original)
