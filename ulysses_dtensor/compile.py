"""torch.compile of a parallelized model: per-block compile, overlap settings, collectives counted.

``UlyssesConfig(compile=True)`` compiles each transformer block on its own with ``fullgraph=True``
(:func:`compile_blocks`), after activation checkpointing and before FSDP2 (torchtitan's order):
the blocks are identical, so one graph serves all, and FSDP2's hooks stay outside the graphs.

Under torch.compile, Dynamo traces through the parallelized forward and its rewrite mode, so the
Ulysses exchanges land in the captured graphs as functional collectives
(``_c10d_functional.all_to_all_single`` + ``wait_tensor``) that Inductor can fuse around and
reorder. ``explain.explain`` shows it: attention sites rewritten, graph breaks, and for the
forward and backward graphs the count and bytes of every collective kind (counted here).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch._dynamo.eval_frame import OptimizedModule

from . import overlap_pass
from .comm_counter import COLLECTIVE_KINDS

# Inductor's scheduler passes that move each collective as early as its inputs allow and each
# wait as late as its first use, so the all-to-alls overlap independent compute (the next
# projection, FSDP's all-gathers) instead of blocking in place.
OVERLAP_OPTIONS = {
    "reorder_for_compute_comm_overlap": True,
    "reorder_for_compute_comm_overlap_passes": [
        "reorder_communication_preserving_peak_memory",
        "sink_waits_iterative",
        "reorder_communication_preserving_peak_memory",
    ],
}


COMPILE_OVERLAP_MODES = ("inductor", "fx_pass", "off")


def compile_blocks(blocks: list[nn.Module], backend: str | Callable = "inductor") -> None:
    """``block.compile(backend=backend, fullgraph=True)`` for each block, in place.

    The module stays where it is (``nn.Module.compile``), so state-dict names, FSDP2 units and
    checkpoint wrappers are unchanged. Called after activation checkpointing (the checkpointed
    block is what gets compiled, so the recompute is in the graph) and before FSDP2 (whose
    ``fully_shard`` then puts its hooks around the compiled call).
    """
    if not blocks:
        raise ValueError("UlyssesConfig(compile=True): no transformer blocks found (set block_classes)")
    # (the rewrite mode a checkpointed body re-enters is allowed by the parallelized forward itself,
    # for its own duration: parallelize._checkpointed_bodies_enter_rewrite)
    for block in blocks:
        block.compile(backend=backend, fullgraph=True)


class WholeModelCompileError(torch._dynamo.exc.Unsupported, ValueError):
    """``torch.compile(model, fullgraph=True)`` of a model whose FSDP2 hooks Dynamo cannot trace.
    An ``Unsupported`` so that Dynamo raises it as it is, a ValueError for everyone else."""


def refuse_fullgraph_compile_with_fsdp(model_name: str) -> None:
    """Called from traced code (the root's input check): under ``fullgraph=True``, raise our error
    naming ``UlyssesConfig(compile=True)`` before Dynamo reaches FSDP2's hooks and fails there with
    its own "function marked as skipped". Without fullgraph nothing happens: Dynamo breaks the
    graph at the hooks and the model runs (a graph per block)."""
    from torch._dynamo.comptime import comptime

    # _raise_if_fullgraph reads ``model_name`` from this frame's locals (comptime allows no closure)
    comptime(_raise_if_fullgraph)  # runs at trace time, where the tracer's flags are visible


def _raise_if_fullgraph(ctx) -> None:
    # the tracer's own flags: torch offers no public way to ask for fullgraph from traced code
    tx = ctx._i_will_not_complain_if_bc_breaks_InstructionTranslator()
    if getattr(tx, "one_graph", False) or getattr(tx, "error_on_graph_break", False):
        model_name = ctx.get_local("model_name").as_python_constant()
        raise WholeModelCompileError(
            f"torch.compile(..., fullgraph=True) of the whole parallelized {model_name} with FSDP2: Dynamo "
            "cannot trace FSDP2's hooks. Use UlyssesConfig(compile=True), which compiles each transformer "
            "block with fullgraph=True before FSDP2 wraps it (torchtitan's order), or UlyssesConfig(fsdp=False) "
            "to compile the whole model"
        )


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` compiled on their own (``nn.Module.compile`` or wrapped in
    ``torch.compile``)."""
    return [m for m in model.modules() if isinstance(m, OptimizedModule) or m._compiled_call_impl is not None]


def check_compile_overlap(mode: str) -> None:
    if mode not in COMPILE_OVERLAP_MODES:
        raise ValueError(f"UlyssesConfig.compile_overlap={mode!r}: expected one of {COMPILE_OVERLAP_MODES}")


def enable_comm_overlap(mode: str = "inductor") -> None:
    """Set compute/communication overlap for every later Inductor compile (a process-wide setting).

    "inductor": Inductor's scheduler passes (``OVERLAP_OPTIONS``). "fx_pass": those plus our
    post-grad pass (``overlap_pass``: each collective issued before the compute that does not need
    it, estimated peak live bytes kept). "off": Inductor's configuration is left as it is. ``parallelize_module``
    calls it with ``UlyssesConfig.compile_overlap``; graphs without collectives are unaffected.
    """
    import torch._inductor.config as inductor_config

    check_compile_overlap(mode)
    if mode == "off":
        return
    for key, value in OVERLAP_OPTIONS.items():
        setattr(inductor_config, key, value)
    if mode == "fx_pass":
        overlap_pass.install()
    else:
        overlap_pass.uninstall()


@dataclass
class GraphCollectives:
    """Collectives found in one captured FX graph (forward or backward)."""

    kind: str
    counts: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)  # bytes of the collectives' inputs, per kind
    overlapped_matmuls: int = 0  # with compile_overlap="fx_pass": matmuls between an issue and its wait


def count_graph_collectives(gm: torch.fx.GraphModule, kind: str) -> GraphCollectives:
    """Functional collectives in ``gm`` and the size of their inputs (from the traced metadata)."""
    found = GraphCollectives(kind)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "_opname", str(node.target))
        collective = COLLECTIVE_KINDS.get(name)
        if collective is None:
            continue
        found.counts[collective] += 1
        value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(value, torch.Tensor):
            found.bytes[collective] += value.numel() * value.element_size()
    if found.counts:
        found.overlapped_matmuls = _matmuls_overlapped_by_pass(gm.graph)
    return found


def _matmuls_overlapped_by_pass(graph: torch.fx.Graph) -> int:
    """How many matmuls the overlap pass would place between a collective and its wait (on a copy
    of ``graph``)."""
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    overlap_pass.issue_collectives_early(copy)
    return sum(overlap_pass.matmuls_in_flight(copy))


def counting_backend(graphs: list[GraphCollectives]):
    """An aot_autograd backend that records the collectives of each forward/backward graph and
    runs the graphs as they are."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            graphs.append(count_graph_collectives(gm, kind))
            return gm.forward

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
