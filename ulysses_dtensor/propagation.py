"""The model sees the whole sequence: its activations are ``Shard(seq)`` DTensors.

``parallelize_module`` runs a model's own forward on DTensors: the token inputs enter as
``Shard(1)`` on the sp mesh, so every op sees the *global* shape and DTensor's sharding
propagation keeps the activations sharded. ``torch.arange(t)``, ``torch.ones(T, T).tril()``,
RoPE tables, Hugging Face's mask builders and ``query.shape[2]`` all get the global values, so a
model needs no adapter to be exact. Parameters, buffers and tensors the forward creates are
plain tensors; where one meets a DTensor it becomes ``Replicate`` (:func:`replicate_plain_tensors`,
called by the rewrite mode), so the autograd graph holds DTensors only. (torch's
``implicit_replication`` is not enough: its flag is thread-local and autograd restores the
forward's thread state per node, so the backward meets plain tensors mixed with DTensors.)

What this module owns:

* :class:`SequencePropagation`, entered around one forward: :class:`SequenceCollectiveGuard`,
  which refuses every collective DTensor would issue to redistribute an activation (an
  all-gather of the sequence, ...) with an error naming the op and the module, before the
  collective runs. Only the attention exchanges, the loss and an all-reduce of a reduction
  (``x.mean()``, a max for dynamic RoPE) are let through.
* the boundary to plain tensors: :func:`as_replicated` and :func:`grad_share` (a replicated
  tensor's DTensor gradient as this rank's share of the sum), :func:`local_of`, :func:`from_local`.

Attention and the loss are routed by ``rewrite.UlyssesFunctionMode``, which runs them on the
local shards: the exchange, the kernels and the bytes are those of :func:`ulysses_attention`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

from .comm_counter import COLLECTIVE_KINDS

# DTensor redistributes through functional collectives; FSDP2 and our own exchanges use them too
# (FSDP2 eager c10d ops pass unseen; ours run under SequenceCollectiveGuard.allowed()).
_FUNCTIONAL = ("_c10d_functional", "_c10d_functional_autograd", "_dtensor")
# a reduction's all-reduce (Partial -> Replicate of a sum, mean or max) is exact and small
_ALLOWED_KINDS = {"all_reduce"}


class _Replicated(torch.autograd.Function):
    """A plain tensor as a ``Replicate`` DTensor; its gradient goes back as this rank's share."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad_share(grad), None


def as_replicated(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``t`` (the same on every rank: a parameter, a buffer, a tensor the forward built from
    global shapes) as a ``Replicate`` DTensor on ``mesh``."""
    if t.requires_grad:
        return _Replicated.apply(t, mesh)
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def replicated_value(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``t``, already the same value on every rank (a globally reduced loss), as a ``Replicate``
    DTensor whose gradient reaches ``t`` unchanged (``t``'s own graph holds this rank's share)."""
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False, shape=t.shape, stride=t.stride())


def replicate_plain_tensors(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """If a call mixes DTensors and plain tensors, the plain ones as ``Replicate`` DTensors on the
    DTensors' mesh (so the autograd graph saves DTensors only); None if there is nothing to do."""
    mesh, plain = None, False
    for value in (*args, *kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, DTensor):
                mesh = t.device_mesh
            elif isinstance(t, torch.Tensor) and t.dim() > 0:
                plain = True
    if mesh is None or not plain:
        return None

    def convert(value):
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
            return as_replicated(value, mesh)
        return value

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (autograd-aware); a plain tensor is returned as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def from_local(local: torch.Tensor, like: DTensor, shape: torch.Size) -> DTensor:
    """``local`` as a DTensor with ``like``'s mesh and placements and the global ``shape``."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride)


def shard_sequence(t: torch.Tensor, mesh_sp: DeviceMesh, local: torch.Tensor) -> DTensor:
    """The global (B, N, ...) ``t`` as a ``Shard(1)`` DTensor whose local tensor is ``local``."""
    return DTensor.from_local(local, mesh_sp, [Shard(1)], run_check=False, shape=t.shape, stride=t.stride())


def grad_share(grad: torch.Tensor) -> torch.Tensor:
    """The DTensor gradient of a replicated plain tensor as this rank's share of the sum over the
    sp ranks: ``Partial(sum)`` -> its local part; ``Replicate`` -> local / P; ``Shard(d)`` -> its
    rows with zeros elsewhere. Summed over the ranks (FSDP2's reduce-scatter, an all-reduce) the
    shares give the gradient; no collective here."""
    if not isinstance(grad, DTensor):
        return grad
    if grad.device_mesh.ndim != 1:
        raise RuntimeError(f"gradient on a {grad.device_mesh.ndim}-D mesh; the sequence-parallel mesh is 1-D")
    (placement,) = grad.placements
    world = grad.device_mesh.size()
    local = grad._local_tensor
    if placement.is_partial():
        return local / world if placement.reduce_op == "avg" else local
    if placement.is_replicate():
        return local / world
    if isinstance(placement, Shard) and type(placement) is Shard:
        shape, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
        full = local.new_zeros(grad.shape)
        full.narrow(placement.dim, offset[placement.dim], shape[placement.dim]).copy_(local)
        return full
    raise RuntimeError(f"a gradient came back placed {placement}, which has no local share")


class SequenceCollectiveGuard(TorchDispatchMode):
    """Refuse any functional collective issued outside :meth:`allowed` (DTensor redistributing
    an activation), naming the op being propagated and the module running it.

    ``modules`` is the stack of module names currently in their forward (kept by
    :func:`track_modules`).
    """

    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules
        self.allow_depth = 0
        self.op: str | None = None

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Our own collectives (and kernels: flex_attention compiles its own, which Dynamo
        refuses under a dispatch mode): the guard steps off the mode stack when it is on top."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

        off_stack = _pop_mode_temporarily() if _get_current_dispatch_mode() is self else contextlib.nullcontext()
        self.allow_depth += 1
        try:
            with off_stack:
                yield
        finally:
            self.allow_depth -= 1

    # flex_attention (a higher-order op) runs inside the guard on local shards: let it through
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            self.op = str(func)  # let DTensor desugar; its collectives come back through here
            return NotImplemented
        if self.allow_depth == 0 and func.namespace in _FUNCTIONAL:
            kind = COLLECTIVE_KINDS.get(func._opname)
            if kind is not None and kind not in _ALLOWED_KINDS:
                module = self.modules[-1] if self.modules else "(the model's forward)"
                raise RuntimeError(
                    f"parallelize_module: {module} runs {self.op or func} on a sequence-sharded "
                    f"activation, which DTensor can only propagate with an {kind} of the sequence "
                    "(every rank would hold all N tokens). Not supported: write the op so it acts "
                    "per token, or file an issue with the model"
                )
        return func(*args, **kwargs)


def track_modules(model: nn.Module, stack: list[str]) -> list:
    """Forward hooks on every submodule keeping ``stack`` = names of the modules in forward."""

    # Not under torch.compile (the guard is eager only; a list mutation in a traced checkpoint
    # is a side effect Dynamo refuses). One function for all modules, the name on the module:
    # per-module closures would make Dynamo recompile each block compiled on its own.
    def push(module, args):
        if not torch.compiler.is_compiling():
            stack.append(module._ulysses_name)

    def pop(module, args, output):
        if not torch.compiler.is_compiling() and stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        module._ulysses_name = f"{type(module).__name__} {name!r}" if name else type(module).__name__
        handles.append(module.register_forward_pre_hook(push))
        # not always_call: its hook-id guards would recompile each block (the caller clears the
        # stack after a failed forward instead)
        handles.append(module.register_forward_hook(pop))
    return handles


class SequencePropagation:
    """One forward on ``Shard(seq)`` activations, under the collective guard.

    Eager only: under torch.compile the guard (a dispatch mode) is left out; Dynamo traces the
    DTensor program itself.
    """

    def __init__(self, guard: SequenceCollectiveGuard | None, active: bool = True, mesh_sp: DeviceMesh | None = None):
        self.guard = guard
        self.mesh_sp = mesh_sp
        self.active = active  # False: the local-tensor path (plain tensors only)
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        if self.guard is not None and not torch.compiler.is_compiling():
            self.stack.enter_context(self.guard)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def allowed(self):
        """Collectives of ours (attention exchanges, the loss) inside this forward."""
        if self.guard is None or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return self.guard.allowed()
