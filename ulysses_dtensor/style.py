"""``UlyssesAttention``: a ParallelStyle for torch's own ``parallelize_module`` plans.

    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, sp_mesh, {"layers.*.attention": UlyssesAttention()})

The styled module receives this rank's tokens (sequence on ``seq_dim`` of its first tensor
argument) and its ``F.scaled_dot_product_attention`` calls run as Ulysses attention over the 1-D
mesh. It rewrites attention only: inputs, positions and loss stay the caller's job (use
:func:`ulysses_dtensor.parallelize_module` for the whole-model recipe). Shards must be even
(N = P · N_r) unless ``seq_len`` is given.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from .rewrite import UlyssesFunctionMode


class UlyssesAttention(ParallelStyle):
    """Make a module's SDPA calls Ulysses attention over the mesh it is applied with.

    Args:
        seq_dim: sequence dim of the module's first tensor argument (1 for (B, N, C)).
        kernel: local attention kernel (see ``ulysses_attention``).
        seq_len: global sequence length, for uneven shards; default ``N_r * P``.
    """

    def __init__(self, *, seq_dim: int = 1, kernel: str | Callable = "sdpa", seq_len: int | None = None):
        super().__init__()
        self.seq_dim, self.kernel, self.seq_len = seq_dim, kernel, seq_len

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"UlyssesAttention takes a 1-D (sequence-parallel) mesh, got {device_mesh.ndim}-D")
        group, world, original = device_mesh.get_group(), device_mesh.size(), module.forward
        style = self

        def forward(*args, **kwargs):
            first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            seq_len = style.seq_len or first.shape[style.seq_dim] * world
            with UlyssesFunctionMode(group, seq_len, None, style.kernel):
                return original(*args, **kwargs)

        module.forward = forward
        return module
