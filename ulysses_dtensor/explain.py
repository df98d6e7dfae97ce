"""``explain(model, *inputs)``: what torch.compile makes of a parallelized model — attention
calls rewritten, graph breaks, and the collectives of its forward and backward graphs: of the
whole model, or with ``UlyssesConfig(compile=True)`` of each compiled block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .compile import GraphCollectives, compiled_blocks, counting_backend
from .parallelize import handle_of


@dataclass
class CompileReport:
    """Result of :func:`explain`."""

    attention_calls: int
    graph_breaks: int
    break_reasons: list[str]
    graphs: list[GraphCollectives]
    compiled_blocks: int = 0  # UlyssesConfig(compile=True): blocks compiled on their own (graphs are theirs)

    def __str__(self) -> str:
        lines = [f"attention calls rewritten to Ulysses: {self.attention_calls}"]
        if self.compiled_blocks:
            lines.append(f"blocks compiled with fullgraph=True: {self.compiled_blocks}, graph breaks: 0; "
                         f"distinct block graphs (forward and backward): {len(self.graphs)}")
        else:
            lines.append(f"graph breaks: {self.graph_breaks}" + "".join(f"\n  - {r}" for r in self.break_reasons))
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
    ``backward`` and the output holds a scalar loss. With ``UlyssesConfig(compile=True)`` the
    compiled blocks are recompiled on the counting backend for that forward instead, so the
    graphs reported are the blocks' (identical blocks share one). Parameter gradients are left as
    they were. Collective: every rank must call it with the same inputs.
    """
    import torch._dynamo as dynamo

    handle = handle_of(model)  # raises for a model parallelize_module did not prepare
    saved_grads = {p: p.grad for p in model.parameters()}
    blocks = compiled_blocks(model) if handle.config.compile else []
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model(*args, **kwargs)  # eager, so the rewrite counts the attention calls
        attention_calls = handle.last_attention_calls
        dynamo.reset()
        graphs: list[GraphCollectives] = []
        if blocks:
            out = _run_with_counted_blocks(model, blocks, graphs, args, kwargs)
            breaks, reasons = 0, []  # fullgraph=True: a break would have raised
        else:
            with torch.no_grad():
                explanation = dynamo.explain(model)(*args, **kwargs)
            breaks, reasons = explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]
            dynamo.reset()
            out = torch.compile(model, backend=counting_backend(graphs))(*args, **kwargs)
        loss = _scalar_loss(out) if backward else None
        if loss is not None:
            loss.backward()
    finally:
        dynamo.reset()
        for p, grad in saved_grads.items():
            p.grad = grad
    return CompileReport(attention_calls, breaks, reasons, graphs, len(blocks))


def _run_with_counted_blocks(model: nn.Module, blocks: list[nn.Module], graphs: list, args, kwargs):
    """One forward with every compiled block recompiled (fullgraph) on the counting backend;
    the blocks' own compiled calls are put back afterwards (the backward runs the counted graphs)."""
    saved = [b._compiled_call_impl for b in blocks]
    backend = counting_backend(graphs)
    try:
        for block in blocks:
            block.compile(backend=backend, fullgraph=True)
        return model(*args, **kwargs)
    finally:
        for block, compiled in zip(blocks, saved):
            block._compiled_call_impl = compiled


def _scalar_loss(out):
    for value in (getattr(out, "loss", None), *(out if isinstance(out, (tuple, list)) else (out,))):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.requires_grad:
            return value
    return None
