"""An Inductor post-grad graph pass that issues each collective before the compute that does not
need it, so the transfer overlaps that compute.

In the backward of a Ulysses layer the output-gradient all-to-all depends only on the attention
output projection's input gradient, yet the traced order computes the MLP's and the projection's
weight gradients first, then packs, issues and at once waits for the exchange. Inductor's own
reordering (``reorder_communication_preserving_peak_memory``) moves a collective only past
neighbours it does not depend on, so the pack kernel in front of it stops it. This pass moves the
whole producer chain instead:

* for each functional collective, the nodes between it and the previous collective that it does
  not depend on are moved after it (the collective and its producers run first, then the
  independent compute while the transfer is in flight) — as far as that does not raise the
  graph's peak of live tensor bytes (:class:`Liveness`);
* each ``wait_tensor`` is moved down to just before its first user;
* inside Inductor, ordering edges (``control_deps``, as torch's own overlap scheduler uses) keep
  the matmuls between an issue and its wait there.

Collectives keep their relative order (every rank issues them in the same order); impure and
random nodes are not moved and bound the window. The pass is installed through Inductor's
documented ``post_grad_custom_post_pass`` hook (:func:`install`) and leaves graphs without
collectives unchanged.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_WAIT = torch.ops._c10d_functional.wait_tensor.default
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default)


def _is_collective(node: torch.fx.Node) -> bool:
    """A functional collective issue (its result goes through ``wait_tensor``)."""
    return (
        node.op == "call_function"
        and getattr(node.target, "namespace", None) == "_c10d_functional"
        and node.target is not _WAIT
    )


def _is_barrier(node: torch.fx.Node) -> bool:
    """Nodes the pass never moves others across: graph inputs and outputs, collectives, nodes with
    side effects (except waits, which only block) and random ops (moving them changes the draw)."""
    if node.op in ("placeholder", "output") or _is_collective(node):
        return True
    if node.op != "call_function" or node.target is _WAIT:
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or node.is_impure()


@dataclass
class OverlapStats:
    """What one run of the pass did: per collective, the nodes moved to run during its transfer."""

    collectives: int = 0
    moved_nodes: int = 0  # nodes moved behind a collective's issue (waits not counted)
    sunk_waits: int = 0
    pinned: int = 0  # nodes given ordering edges


def issue_collectives_early(graph: torch.fx.Graph, pin: bool = False) -> OverlapStats:
    """Reorder ``graph`` in place: each collective right after its producers, the independent
    nodes before it moved after it where that does not raise the graph's peak of live tensor
    bytes, and each wait just before its first user. With ``pin``, ordering edges (Inductor's
    ``control_deps``) keep the moved matmuls between issue and wait through Inductor's own
    scheduling, which reorders for peak memory. Returns what moved."""
    stats = OverlapStats()
    liveness = Liveness(graph)  # storages, sizes and uses do not depend on the order
    window: list[torch.fx.Node] = []
    for node in list(graph.nodes):
        if not _is_barrier(node):
            window.append(node)
            continue
        if _is_collective(node):
            stats.collectives += 1
            moved = _move_independent_after(node, window, liveness)
            stats.moved_nodes += sum(1 for n in moved if n.target is not _WAIT)
        window = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _WAIT and _sink(node):
            stats.sunk_waits += 1
    edges = _overlap_edges(graph) if pin else {}
    if edges:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
        from torch.utils._ordered_set import OrderedSet

        preserve_node_ordering(graph, {n: OrderedSet(d) for n, d in edges.items()})
        stats.pinned = len(edges)
    return stats


def _in_flight(graph: torch.fx.Graph):
    """Per collective of ``graph``, in order: (collective, its first wait, the matmuls between)."""
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    for collective in filter(_is_collective, order):
        waits = [u for u in collective.users if u.target is _WAIT]
        if waits:
            wait = min(waits, key=position.__getitem__)
            yield collective, wait, [n for n in order[position[collective] + 1:position[wait]] if n.target in MATMULS]


def matmuls_in_flight(graph: torch.fx.Graph) -> list[int]:
    """Per collective of ``graph``, in order: the matmuls placed between its issue and its wait."""
    return [len(matmuls) for _, _, matmuls in _in_flight(graph)]


def _overlap_edges(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """Ordering edges that keep each matmul now between a collective and its wait there: Inductor's
    scheduler reorders for peak memory and would otherwise put them back in front of the issue.
    Read off the final order, so the edges agree with it and cannot form a cycle."""
    edges: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for collective, wait, matmuls in _in_flight(graph):
        matmuls = [n for n in matmuls if n not in edges]
        if matmuls:
            edges.update({n: [collective] for n in matmuls})
            edges[wait] = [matmuls[-1]]
    return edges


def _move_independent_after(collective: torch.fx.Node, window: list[torch.fx.Node],
                            liveness: "Liveness") -> list[torch.fx.Node]:
    """Move nodes of ``window`` (the nodes since the previous barrier) that ``collective`` does not
    depend on to just after it, so they run while its transfer is in flight, as long as the
    graph's peak live bytes do not grow (memory is what sequence parallelism is for): all of them
    if that fits, else one at a time, latest first, each only if the window's nodes that use it
    moved too (the order stays topological).
    Returns the moved nodes in their new order."""
    in_window = set(window)
    needed: set[torch.fx.Node] = set()
    stack = [n for n in collective.all_input_nodes if n in in_window]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(m for m in n.all_input_nodes if m in in_window)
    candidates = [n for n in reversed(window) if n not in needed and n.op == "call_function"]
    if not candidates:
        return []
    order = list(collective.graph.nodes)
    start = order.index(window[0])
    segment = order[start:order.index(collective) + 1]  # only these nodes change places
    base, peak = liveness.before_and_peak(order, start)
    later = frozenset(order[start + len(segment):])

    def fits(moving: list[torch.fx.Node]) -> bool:  # moving: in their new order
        trial = [m for m in segment if m not in moving] + moving
        return base + max(liveness.profile(trial, later)) <= peak

    # All of them if that fits (the set is closed under use: a user of an independent node is
    # independent too), else one at a time, latest first.
    moved = candidates if fits(candidates[::-1]) else []  # newest first, so reversed it is the new order
    for n in candidates if not moved else ():
        if any(u in in_window and u not in moved for u in n.users):
            continue
        if fits([n, *reversed(moved)]):
            moved.append(n)
    anchor = collective
    for n in reversed(moved):
        anchor.append(n)
        anchor = n
    return list(reversed(moved))


class Liveness:
    """Live tensor bytes of a graph's nodes in a given order (any device), from Inductor's storage
    and alias tracking: a storage is alive from the node that allocates it (graph inputs: from the
    start) to its last user; constants stay alive."""

    def __init__(self, graph: torch.fx.Graph):
        from torch._inductor.fx_passes.memory_estimator import GraphAliasTracker
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        tracker = GraphAliasTracker(list(graph.nodes))
        self.size = {k: optimization_hint(k.storage.nbytes()) for k in tracker.storage_to_allocator}
        self.allocates = tracker.node_to_fresh_allocations
        self.uses = tracker.node_to_storage_uses
        self.users = tracker.storage_to_uses
        # Graph inputs count as freed after their last use, as Inductor's wrapper does with the
        # backward's saved activations (it clears its argument list): moving the last use of a
        # saved activation later must show as the memory it costs.
        self.kept = {k for k, n in tracker.storage_to_allocator.items() if n.op == "get_attr"}

    def profile(self, nodes: list[torch.fx.Node], later: frozenset = frozenset()) -> list[int]:
        """Live bytes once each node of ``nodes`` has allocated, counted from 0; a storage is freed
        after its last user in ``nodes`` unless a node in ``later`` uses it too."""
        pending = collections.Counter(k for n in nodes for k in self.uses.get(n, ()))
        live, out = 0, []
        for n in nodes:
            live += sum(self.size[k] for k in self.allocates.get(n, ()))
            out.append(live)
            for k in self.uses.get(n, ()):
                pending[k] -= 1
                if not pending[k] and k not in self.kept and not any(u in later for u in self.users[k]):
                    live -= self.size[k]
        return out

    def before_and_peak(self, order: list[torch.fx.Node], start: int) -> tuple[int, int]:
        """Live bytes just before ``order[start]`` runs, and the peak over all of ``order``."""
        profile = self.profile(order)
        allocated = sum(self.size[k] for k in self.allocates.get(order[start], ()))
        return profile[start] - allocated, max(profile, default=0)


def peak_live_bytes(graph: torch.fx.Graph) -> int:
    """Peak bytes of tensors alive while ``graph`` runs in its node order (:class:`Liveness`)."""
    return Liveness(graph).before_and_peak(list(graph.nodes), 0)[1]


def _sink(wait: torch.fx.Node) -> bool:
    """Move ``wait`` to just before its first user; True if it moved."""
    if not wait.users:
        return False
    position = {n: i for i, n in enumerate(wait.graph.nodes)}
    first_user = min(wait.users, key=position.__getitem__)
    if first_user.prev is wait:
        return False
    first_user.prepend(wait)
    return True


class IssueCollectivesEarly(CustomGraphPass):
    """The pass as an Inductor ``CustomGraphPass`` (cacheable: its uuid is this file's hash)."""

    last_stats: collections.deque[OverlapStats] = collections.deque(maxlen=32)  # newest graphs, for tests

    def __call__(self, graph: torch.fx.Graph) -> None:
        IssueCollectivesEarly.last_stats.append(issue_collectives_early(graph, pin=True))

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def install() -> None:
    """Add the pass to Inductor's ``post_grad_custom_post_pass`` for every later compile, next to
    a pass the user set there already (idempotent)."""
    _set_passes(_user_passes() + [IssueCollectivesEarly()])


def uninstall() -> None:
    """Remove the pass from Inductor's configuration (a user's own passes stay)."""
    _set_passes(_user_passes())


def _user_passes() -> list:
    import torch._inductor.config as inductor_config

    current = inductor_config.post_grad_custom_post_pass
    passes = list(current) if isinstance(current, (list, tuple)) else ([] if current is None else [current])
    return [p for p in passes if not isinstance(p, IssueCollectivesEarly)]


def _set_passes(passes: list) -> None:
    import torch._inductor.config as inductor_config

    inductor_config.post_grad_custom_post_pass = None if not passes else passes[0] if len(passes) == 1 else passes
