"""``explain(model, *inputs)``: what torch.compile makes of a parallelized model — attention
calls rewritten, graph breaks, and the collectives of its forward and backward graphs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .compile import GraphCollectives, counting_backend
from .parallelize import _SequenceParallelForward


@dataclass
class CompileReport:
    """Result of :func:`explain`."""

    attention_calls: int
    graph_breaks: int
    break_reasons: list[str]
    graphs: list[GraphCollectives]

    def __str__(self) -> str:
        lines = [
            f"attention calls rewritten to Ulysses: {self.attention_calls}",
            f"graph breaks: {self.graph_breaks}" + "".join(f"\n  - {r}" for r in self.break_reasons),
        ]
        for g in self.graphs:
            parts = ", ".join(f"{n} {k} ({g.bytes[k]:,} bytes in)" for k, n in sorted(g.counts.items()))
            lines.append(f"{g.kind} graph: {parts or 'no collectives'}")
            if g.counts:
                lines.append(f"  with compile_overlap=\"fx_pass\": {g.overlapped_matmuls} matmuls run during transfers")
        return "\n".join(lines)


def explain(model: nn.Module, *args, backward: bool = True, **kwargs) -> CompileReport:
    """Trace a parallelized ``model`` on example inputs and report what compiling it gives.

    Runs one eager forward (counting the rewritten attention calls), ``torch._dynamo.explain``
    (graph breaks) and one compiled forward with a counting backend — plus its backward when
    ``backward`` and the output holds a scalar loss. Parameter gradients are left as they were.
    Collective: every rank must call it with the same inputs.
    """
    import torch._dynamo as dynamo

    if not isinstance(model.forward, _SequenceParallelForward):
        raise ValueError("explain() takes a model prepared by ulysses_dtensor.parallelize_module")
    saved_grads = {p: p.grad for p in model.parameters()}
    try:
        with torch.no_grad():
            model(*args, **kwargs)
        attention_calls = model.forward.last_attention_calls
        dynamo.reset()
        with torch.no_grad():
            explanation = dynamo.explain(model)(*args, **kwargs)
        reasons = [str(b.reason) for b in explanation.break_reasons]
        dynamo.reset()
        graphs: list[GraphCollectives] = []
        out = torch.compile(model, backend=counting_backend(graphs))(*args, **kwargs)
        loss = _scalar_loss(out) if backward else None
        if loss is not None:
            loss.backward()
    finally:
        dynamo.reset()
        for p, grad in saved_grads.items():
            p.grad = grad
    return CompileReport(attention_calls, explanation.graph_break_count, reasons, graphs)


def _scalar_loss(out):
    for value in (getattr(out, "loss", None), *(out if isinstance(out, (tuple, list)) else (out,))):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.requires_grad:
            return value
    return None
