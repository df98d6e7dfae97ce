"""Model inputs and outputs along the sharded sequence: slicing, labels, positions, gathering.

Conventions (sequence dim 1, as in ``input_ids: (B, N)``):

* A plain tensor given to a parallelized model is the *global* batch, the same on every sp rank;
  each rank keeps its slice (DTensor ``Shard(1)`` layout: ``ceil(N/P)`` tokens, the last fewer).
* A DTensor placed ``Shard(1)`` on the sp mesh (what :func:`shard_batch` returns) is already
  sharded: its local tensor is used as is and its global shape gives N.
* Labels are shifted on the global sequence *before* slicing (``shift_labels``), so the label
  of each shard's last token — the next shard's first token — is not lost.
* ``position_ids`` are global positions, so RoPE sees the same angles as in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .layout import seq_shard_offsets, seq_shard_sizes
from .mesh import sp_mesh

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[:, 1:]`` padded with ``ignore_index``: the target of each position. (B, N)."""
    pad = labels.new_full((*labels.shape[:1], 1, *labels.shape[2:]), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def local_slice(t: torch.Tensor, rank: int, world: int, seq_len: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a global tensor along ``dim``."""
    sizes = seq_shard_sizes(seq_len, world)
    return t.narrow(dim, seq_shard_offsets(sizes)[rank], sizes[rank])


def shard_batch(
    batch: dict[str, torch.Tensor] | torch.Tensor,
    mesh: DeviceMesh,
    *,
    ignore_index: int = IGNORE_INDEX,
    add_position_ids: bool = True,
    add_shift_labels: bool = True,
) -> dict[str, DTensor] | DTensor:
    """Split a data loader's batch along the sequence for this rank of the sp mesh.

    ``batch`` is this data-parallel replica's batch (the same on every sp rank): a tensor or a
    dict with ``input_ids`` / ``labels`` / ``position_ids`` / ``attention_mask`` (B, N) and any
    (B, N, ...) tensor. Returns DTensors placed ``Shard(1)`` on the sp mesh, plus
    ``position_ids`` (global positions) and ``shift_labels`` (``labels`` shifted before
    sharding) unless disabled. An all-ones ``attention_mask`` is dropped; padding is refused.
    """
    mesh_sp = sp_mesh(mesh)
    if isinstance(batch, torch.Tensor):
        return _to_shard(batch, mesh_sp)
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a tensor or a dict of tensors, got {type(batch).__name__}")
    batch = dict(batch)
    seq_len = global_seq_len(batch, "shard_batch")
    check_no_padding(batch.pop("attention_mask", None), "shard_batch")
    if add_shift_labels and "labels" in batch and "shift_labels" not in batch:
        batch["shift_labels"] = shift_labels(batch["labels"], ignore_index)
    if add_position_ids and "position_ids" not in batch and "input_ids" in batch:
        ids = batch["input_ids"]
        batch["position_ids"] = torch.arange(seq_len, device=ids.device).expand(ids.shape[0], seq_len)
    return {k: _to_shard(v, mesh_sp) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _to_shard(t: torch.Tensor, mesh_sp: DeviceMesh) -> DTensor:
    rank, world = mesh_sp.get_local_rank(), mesh_sp.size()
    if t.dim() < 2:
        raise ValueError(f"batch tensors need a sequence dim 1, got shape {tuple(t.shape)}")
    local = local_slice(t, rank, world, t.shape[1]).contiguous()
    return DTensor.from_local(local, mesh_sp, [Shard(1)], run_check=False, shape=t.shape, stride=t.stride())


def global_seq_len(named: dict, model_name: str) -> int:
    """The sequence length (dim 1) all inputs share; DTensors count with their global shape."""
    lengths = {}
    for name, value in named.items():
        if isinstance(value, DTensor):
            if value.placements != (Shard(1),):
                raise ValueError(f"{model_name}: DTensor input {name!r} must be placed Shard(1) on the sp mesh, got {value.placements}")
            lengths[name] = value.shape[1]
        elif isinstance(value, torch.Tensor) and value.dim() >= 2:
            lengths[name] = value.shape[1]
    if not lengths:
        raise ValueError(f"{model_name}: no input tensor with a sequence dim (dim 1) to shard")
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{model_name}: inputs disagree on the sequence length (dim 1): {lengths}; every input tensor "
            "with 2+ dims is sliced along dim 1"
        )
    return next(iter(lengths.values()))


def check_no_padding(mask, model_name: str) -> None:
    """Refuse padded attention masks: sequence parallelism needs every token real (for now)."""
    if mask is None:
        return
    local = mask.to_local() if isinstance(mask, DTensor) else mask
    if local.dim() != 2 or not bool(local.all()):
        raise ValueError(
            f"{model_name}: attention_mask must be absent or all ones (no padding) under sequence "
            "parallelism; causal masking is applied over the global sequence"
        )


def gather_sequence(x: torch.Tensor, mesh: DeviceMesh, seq_dim: int = 1, seq_len: int | None = None) -> torch.Tensor:
    """The full-sequence tensor from this rank's shard (or a ``Shard(seq_dim)`` DTensor).

    Autograd-aware (backward keeps this rank's slice). ``seq_len`` is the global length; when
    omitted it is gathered from the ranks (one tiny collective).
    """
    if isinstance(x, DTensor):
        return x.full_tensor()
    mesh_sp = sp_mesh(mesh)
    if seq_len is None:
        sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(mesh_sp.size())]
        dist.all_gather(sizes, torch.tensor(x.shape[seq_dim], device=x.device), group=mesh_sp.get_group())
        seq_len = int(sum(s.item() for s in sizes))
    shape = list(x.shape)
    shape[seq_dim] = seq_len
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(x, mesh_sp, [Shard(seq_dim)], run_check=False, shape=torch.Size(shape), stride=stride).full_tensor()
