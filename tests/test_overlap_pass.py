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


def _exchange_graph(independent_bytes: int):
    """x -> big = relu(x) -> small = sum(big)  (independent of the exchange)
       y -> send = clone(y) -> all_to_all -> wait -> out = recv + small"""
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
        x.meta["val"] = torch.empty(independent_bytes // 4)
        y.meta["val"] = torch.empty(MiB // 4)
    big = node(aten.relu.default, x, numel=independent_bytes // 4)
    small = node(aten.sum.default, big, numel=1)
    send = node(aten.clone.default, y, numel=MiB // 4)
    recv = node(A2A, send, [MiB // 8] * 2, [MiB // 8] * 2, "0", numel=MiB // 4)
    ready = node(WAIT, recv, numel=MiB // 4)
    out = node(aten.add.Tensor, ready, small, numel=MiB // 4)
    graph.output(out)
    return graph, {"big": big, "small": small, "exchange": recv, "wait": ready}


def _order(graph):
    return [n.name for n in graph.nodes if n.op == "call_function"]


def test_small_independent_work_moves_behind_the_issue():
    """Work the exchange does not need, and whose buffers fit under the peak, runs while the
    transfer is in flight."""
    graph, n = _exchange_graph(independent_bytes=MiB // 4)
    before = peak_live_bytes(graph)
    stats = issue_collectives_early(graph)
    graph.lint()
    order = _order(graph)
    assert order.index(n["exchange"].name) < order.index(n["big"].name) < order.index(n["wait"].name), order
    assert stats.collectives == 1 and stats.moved_nodes == 2, stats
    assert peak_live_bytes(graph) <= before


def test_work_that_would_raise_the_peak_stays():
    """Moving the 4 MiB intermediate behind the issue would hold it next to the send and receive
    buffers: a higher peak, so the pass leaves the order alone."""
    graph, n = _exchange_graph(independent_bytes=4 * MiB)
    before_order, before = _order(graph), peak_live_bytes(graph)
    stats = issue_collectives_early(graph)
    graph.lint()
    assert stats.moved_nodes == 0, stats
    assert _order(graph) == before_order and peak_live_bytes(graph) == before


def test_peak_live_bytes_counts_storages_from_allocation_to_last_use():
    graph, _ = _exchange_graph(independent_bytes=4 * MiB)
    # inputs stay alive (4 MiB + 1 MiB); relu's 4 MiB is the largest step
    assert peak_live_bytes(graph) == 9 * MiB + 4  # + the 4-byte sum, made while relu's output is alive
