"""The (dp, sp) DeviceMesh: data parallel × sequence parallel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def init_mesh(dp: int = 1, sp: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """A 2-D DeviceMesh with dims ("dp", "sp"); ``sp`` defaults to ``world_size // dp``.

    Ranks ``r`` with the same ``r // sp`` share a data-parallel replica and split its sequence.
    ``device_type`` defaults to "cuda" when available, else "cpu".
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group (or run under torchrun) first")
    world = dist.get_world_size()
    if dp < 1 or world % dp:
        raise ValueError(f"dp={dp} does not divide the world size {world}")
    sp = world // dp if sp is None else sp
    if dp * sp != world:
        raise ValueError(f"mesh dp={dp} x sp={sp} = {dp * sp} ranks does not match the world size {world}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))


def check_mesh(mesh: DeviceMesh) -> None:
    """Refuse meshes parallelize_module cannot use, naming what to change."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names or ()
    if "sp" not in names:
        raise ValueError(
            f"mesh has dims {names or '(unnamed)'} but needs an 'sp' dim: use ulysses_dtensor.init_mesh(dp, sp) "
            "or init_device_mesh(..., mesh_dim_names=('dp', 'sp'))"
        )
    if mesh.ndim > 2 or (mesh.ndim == 2 and names[0] != "dp"):
        raise ValueError(f"mesh must be 1-D ('sp',) or 2-D ('dp', 'sp'), got dims {names}")


def sp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The sequence-parallel sub-mesh of ``mesh``."""
    return mesh["sp"] if mesh.ndim > 1 else mesh


def dp_sp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All ranks of ``mesh`` as one 1-D mesh (dp × sp flattened): FSDP2 shards parameters over
    it, like ZeRO-3 over the combined data- and sequence-parallel group."""
    return mesh if mesh.ndim == 1 else mesh["dp", "sp"]._flatten("dp_sp")
