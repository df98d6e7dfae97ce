"""The overlap pass on hand-built graphs (no process group: the graphs are only reordered and
measured, never run): what it moves, and that it never raises the graph's peak live bytes."""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ulysses_dtensor.overlap_pass import issue_collectives_early, peak_live_bytes

aten = torch.ops.aten
A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
MiB = 1 << 20


def _exchange_graph(x_used_after: bool):
    """x (4 MiB) -> small = sum(x)                  (independent of the exchange)
       y (1 MiB) -> send = clone(y) -> all_to_all -> wait -> out = recv + small
       and, if ``x_used_after``, tail = x + 1 after the exchange (x stays alive anyway)."""
    graph = torch.fx.Graph()
    fake = FakeTensorMode()

    def node(target, *args, numel):
        n = graph.call_function(target, args)
        with fake:
            n.meta["val"] = torch.empty(numel)
        return n

    x = graph.placeholder("x")
    y = graph.placeholder("y")
    with fake:
        x.meta["val"] = torch.empty(MiB)
        y.meta["val"] = torch.empty(MiB // 4)
    small = node(aten.sum.default, x, numel=1)
    send = node(aten.clone.default, y, numel=MiB // 4)
    recv = node(A2A, send, [MiB // 8] * 2, [MiB // 8] * 2, "0", numel=MiB // 4)
    ready = node(WAIT, recv, numel=MiB // 4)
    out = node(aten.add.Tensor, ready, small, numel=MiB // 4)
    outputs = [out]
    if x_used_after:
        outputs.append(node(aten.add.Tensor, x, 1, numel=MiB))
    graph.output(tuple(outputs))
    return graph, {"small": small, "exchange": recv, "wait": ready}


def _order(graph):
    return [n.name for n in graph.nodes if n.op == "call_function"]


def test_independent_work_moves_behind_the_issue():
    """Work the exchange does not need, whose input stays alive anyway, runs while the transfer is
    in flight; the peak does not change."""
    graph, n = _exchange_graph(x_used_after=True)
    before = peak_live_bytes(graph)
    stats = issue_collectives_early(graph)
    graph.lint()
    order = _order(graph)
    assert order.index(n["exchange"].name) < order.index(n["small"].name) < order.index(n["wait"].name), order
    assert stats.collectives == 1 and stats.moved_nodes == 1, stats
    assert peak_live_bytes(graph) == before


def test_work_that_would_raise_the_peak_stays():
    """When the independent sum is the last use of the 4 MiB input, moving it behind the issue would
    hold that input next to the send and receive buffers: a higher peak, so the order stays."""
    graph, _ = _exchange_graph(x_used_after=False)
    before_order, before = _order(graph), peak_live_bytes(graph)
    stats = issue_collectives_early(graph)
    graph.lint()
    assert stats.moved_nodes == 0, stats
    assert _order(graph) == before_order and peak_live_bytes(graph) == before


def test_peak_live_bytes_counts_storages_from_allocation_to_last_use():
    graph, _ = _exchange_graph(x_used_after=False)
    # the inputs (4 MiB + 1 MiB) and the sum's 4 bytes; x is freed after the sum, y after its clone
    assert peak_live_bytes(graph) == 5 * MiB + 4
