"""Count the collectives a rank actually issues and the bytes it sends.

:class:`CollectiveCounter` is a TorchDispatchMode: it sees every functional (``_c10d_functional``)
and eager (``c10d``) collective op at dispatch time, forward and backward, whoever issued it
(our code, DTensor, FSDP), and reads the sizes from the op's own arguments. It does not trust
any bookkeeping of ours, so tests and benchmarks can hold our byte formulas against it.

Bytes sent are what leaves this rank: for an all-to-all, every split but the one addressed to
itself. For other collectives a logical count (all-gather: the input to each of P-1 peers).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective: its kind ("all_to_all", "all_gather", ...), bytes this rank sent to
    other ranks, and the group size."""

    kind: str
    bytes_sent: int
    group_size: int


# collective op name (functional and eager c10d) -> kind; also read by compile.explain
COLLECTIVE_KINDS = {
    "all_to_all_single": "all_to_all",
    "alltoall_base_": "all_to_all",
    "alltoall_": "all_to_all",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
    "send": "send",
    "isend": "send",
}


def _group_of(arg) -> dist.ProcessGroup | None:
    if isinstance(arg, str):  # a group name, or another string argument (all_reduce's "sum")
        try:
            return torch.distributed.distributed_c10d._resolve_process_group(arg)
        except (RuntimeError, ValueError):
            return None
    if isinstance(arg, dist.ProcessGroup):
        return arg
    if isinstance(arg, torch.ScriptObject):  # eager c10d ops receive the group boxed
        try:
            return dist.ProcessGroup.unbox(arg)
        except (RuntimeError, TypeError):
            return None
    return None


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _all_to_all_bytes(inp: torch.Tensor, input_splits, group: dist.ProcessGroup) -> int:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rows = inp.shape[0] if inp.dim() else 1
    row_bytes = inp.numel() * inp.element_size() // max(rows, 1)
    splits = list(input_splits) if input_splits else [rows // world] * world
    return (sum(splits) - splits[rank]) * row_bytes


class CollectiveCounter(TorchDispatchMode):
    """Record every collective dispatched while active.

    Example::

        with CollectiveCounter() as counter:
            loss = model(x).sum(); loss.backward()
        counter.counts()        # Counter({'all_to_all': 4})
        counter.bytes_sent()    # bytes this rank sent to others
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[CollectiveRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor desugar first; the collectives it issues come back through this mode.
            return NotImplemented
        namespace = func.namespace
        if namespace in ("_c10d_functional", "c10d", "_c10d_functional_autograd", "_dtensor"):
            self._record(func._opname, args)
        return func(*args, **kwargs)

    def _record(self, name: str, args) -> None:
        if name == "shard_dim_alltoall":  # DTensor's own op; record what it decomposes into
            return
        kind = COLLECTIVE_KINDS.get(name)
        if kind is None:
            return
        group = next((g for g in map(_group_of, args) if g is not None), None)
        world = dist.get_world_size(group) if group is not None else 1
        if kind == "all_to_all":
            if name == "all_to_all_single":  # (input, output_splits, input_splits, group_name)
                sent = _all_to_all_bytes(args[0], args[2], group)
            elif name == "alltoall_base_":  # (output, input, group, output_splits, input_splits, ...)
                sent = _all_to_all_bytes(args[1], args[4], group)
            else:  # alltoall_(outputs, inputs, group, ...)
                sent = _nbytes(args[1]) * (world - 1) // max(world, 1)
        elif kind == "all_gather":
            inp = args[1] if name in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_") else args[0]
            sent = _nbytes(inp) * (world - 1)
        elif kind == "reduce_scatter":
            inp = args[1] if name.startswith("_") or name.endswith("_") else args[0]
            sent = _nbytes(inp) * (world - 1) // max(world, 1)
        elif kind == "all_reduce":
            sent = 2 * _nbytes(args[0]) * (world - 1) // max(world, 1)
        else:
            sent = _nbytes(args[0])
        self.records.append(CollectiveRecord(kind, sent, world))

    def counts(self) -> Counter:
        """Number of collectives by kind."""
        return Counter(r.kind for r in self.records)

    def bytes_sent(self, kind: str | None = None) -> int:
        """Bytes this rank sent to other ranks, over all collectives or one kind."""
        return sum(r.bytes_sent for r in self.records if kind is None or r.kind == kind)

    def reset(self) -> None:
        self.records.clear()
