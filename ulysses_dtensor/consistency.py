"""Cross-rank consistency checks, each one small all-gather at setup (never per step).

Ranks that disagree about the model or about the shape of a batch do not fail on their own: they
issue mismatched collectives, which hang or, worse, silently mix data. These checks compare
metadata across ranks once and raise the same ValueError on every rank, naming the ranks that
differ and what to change.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _describe(model: nn.Module) -> tuple[str, tuple[float, ...] | None]:
    """(digest of parameter names, shapes and dtypes; float64 sums of the values or None)."""
    spec = hashlib.sha256()
    sums = []
    for name, p in model.named_parameters():
        spec.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if p.is_meta or isinstance(p, DTensor):
            sums = None  # not yet initialized, or already distributed: values not comparable
        elif sums is not None:
            sums.append(float(p.detach().double().sum()))
    return spec.hexdigest(), tuple(sums) if sums is not None else None


def _gather(obj, group: dist.ProcessGroup) -> tuple[list, list[int]]:
    """Every rank's ``obj`` (one all_gather_object) and their global ranks, in group order."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, obj, group=group)
    return every, dist.get_process_group_ranks(group)


def _differ_from_first(values: list, ranks: list[int]) -> list[int]:
    """The global ranks whose value differs from the first rank's."""
    return [rank for rank, value in zip(ranks, values) if value != values[0]]


def check_same_model(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Raise on every rank unless all ranks of ``group`` hold the same parameters (names, shapes,
    dtypes, and values where they are materialized). One all_gather_object."""
    if dist.get_world_size(group) == 1:
        return
    every, ranks = _gather(_describe(model), group)
    spec_differs = _differ_from_first([spec for spec, _ in every], ranks)
    if spec_differs:
        raise ValueError(
            f"parallelize_module: the model differs across ranks: global ranks {spec_differs} have other "
            f"parameter names, shapes or dtypes than rank {ranks[0]}; build the same model (same config "
            "and dtype) on every rank"
        )
    if all(sums is not None for _, sums in every):
        value_differs = _differ_from_first([sums for _, sums in every], ranks)
        if value_differs:
            raise ValueError(
                f"parallelize_module: parameter values differ across ranks: global ranks {value_differs} "
                f"differ from rank {ranks[0]}; seed the initialization identically on every rank "
                "(torch.manual_seed before building the model) or load the same checkpoint"
            )


def check_same_input_shapes(shapes: dict[str, tuple], group: dist.ProcessGroup, model_name: str) -> None:
    """Raise on every rank unless all ranks of ``group`` got inputs of the same shapes (the sp
    ranks of a replica must feed the same global batch). One all_gather_object."""
    if dist.get_world_size(group) == 1:
        return
    every, ranks = _gather(shapes, group)
    differ = _differ_from_first(every, ranks)
    if differ:
        raise ValueError(
            f"{model_name}: the sequence-parallel ranks got inputs of different shapes: rank {ranks[0]} "
            f"{every[0]}, rank {differ[0]} {every[ranks.index(differ[0])]}; every sp rank of a data-parallel "
            "replica must be given the same global batch (or shard_batch output of the same batch)"
        )
