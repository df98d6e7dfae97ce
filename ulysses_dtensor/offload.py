"""Activation offload: full checkpointing whose kept block inputs live in host memory.

With full activation checkpointing a block keeps only its input from forward to backward, but
at long sequences the inputs of all layers are still the largest thing held (L × N/P × C).
``UlyssesConfig(activation_checkpointing="offload")`` wraps each block's forward in
:class:`_OffloadedBlock`: the block runs without recording a graph, its inputs that need a
gradient (the hidden states) are copied to host memory, and backward copies them back,
recomputes the block with autograd (inside the same Ulysses rewrite, RNG and autocast state as
the forward) and returns the gradients of the inputs and of the block's parameters. FSDP2 sees
an ordinary op: its pre-backward gather runs before, its reduce-scatter after. With
``head_chunks > 1`` the block's attention outputs are kept in host memory too and the recompute
takes them: no attention exchange and no kernel runs twice in forward.

On CUDA the copies go to pinned buffers on a side stream (forward: the device copy is kept
until the transfer completes; backward: the current stream waits for the copy back). On a
CPU-only machine the same code path runs with host = device memory (a plain copy), so it is
tested for exactness here; its memory effect is what the planner counts and what the benchmark
reports as device-resident bytes (``offloaded_bytes`` tells the host-resident ones apart).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from .head_chunks import output_stash
from .rewrite import running_mode

Tensor = torch.Tensor

# storages of the host copies alive now, for the benchmark's device-memory accounting on CPU
_host_copies: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()
_copy_streams: dict = {}


def offloaded_bytes() -> int:
    """Bytes held in host memory right now: block inputs and stashed attention outputs."""
    return sum(t.untyped_storage().nbytes() for t in list(_host_copies.values()))


class _HostCopy:
    """One tensor moved to host memory; ``restore()`` brings it back to its device."""

    def __init__(self, t: Tensor):
        self.spec = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None
        local = t.to_local() if isinstance(t, DTensor) else t
        local = local.detach()
        self.device, self.event = local.device, None
        if local.is_cuda:
            stream = _copy_streams.setdefault(local.device, torch.cuda.Stream(local.device))
            stream.wait_stream(torch.cuda.current_stream(local.device))
            self.host = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(local, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            local.record_stream(stream)  # the caching allocator keeps it until the copy is done
        else:
            self.host = local.clone()
        _host_copies[id(self.host)] = self.host

    def restore(self) -> Tensor:
        if self.event is not None:
            self.event.synchronize()
            local = self.host.to(self.device, non_blocking=True)
        else:
            local = self.host
        self.host = None
        if self.spec is not None:
            mesh, placements, shape, stride = self.spec
            return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
        return local


class _AttentionOutputs:
    """The block's head-chunked attention outputs (``head_chunks.output_stash``), in host memory
    from the forward to the recompute, which takes them instead of exchanging q/k/v again."""

    def __init__(self):
        self.copies: list[_HostCopy] = []
        self.replaying = False

    def record(self, out: Tensor) -> None:
        if not self.replaying:
            self.copies.append(_HostCopy(out))

    def replay(self) -> Tensor | None:
        if not self.replaying or not self.copies:
            return None
        return self.copies.pop(0).restore()


@contextlib.contextmanager
def _stashing(stash: _AttentionOutputs):
    token = output_stash.set(stash)
    try:
        yield
    finally:
        output_stash.reset(token)


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *inputs: Tensor):
        ctx.call = call
        n = call.n_grad_inputs
        ctx.copies = [_HostCopy(t) for t in inputs[:n]]
        ctx.save_for_backward(*inputs[n:])  # parameters: held by the model anyway
        ctx.stash = _AttentionOutputs()
        with _stashing(ctx.stash):  # detached: no graph is recorded (and hooks see no grad inputs)
            outputs = call.run([t.detach() for t in inputs[:n]])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        call = ctx.call
        params = ctx.saved_tensors
        restored = [c.restore().requires_grad_() for c in ctx.copies]
        ctx.copies = None
        ctx.stash.replaying = True
        with call.recompute_context(), torch.enable_grad(), _stashing(ctx.stash):
            outputs = call.run(restored)
        ctx.stash = None
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = restored + list(params)
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        return (None, *got)


class _BlockCall:
    """One forward call of a block: its non-differentiable arguments and how to rebuild the call."""

    def __init__(self, forward, grad_positions: list[int], leaves: list, spec):
        self.rng = _rng_state(leaves)
        # the differentiable inputs go to host memory: keep no reference to them here
        self.leaves = [None if i in grad_positions else x for i, x in enumerate(leaves)]
        self.forward, self.spec = forward, spec
        self.grad_positions, self.n_grad_inputs = grad_positions, len(grad_positions)
        self.out_spec = None
        self.mode = running_mode()
        self.autocast = _autocast_state()

    def run(self, grad_inputs) -> list[Tensor]:
        leaves = list(self.leaves)
        for pos, t in zip(self.grad_positions, grad_inputs):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = self.forward(*args, **kwargs)
        flat, self.out_spec = pytree.tree_flatten(out)
        self.out_is_tensor = [isinstance(x, Tensor) for x in flat]
        self.out_other = [None if isinstance(x, Tensor) else x for x in flat]
        return [x for x in flat if isinstance(x, Tensor)]

    def rebuild(self, tensors) -> object:
        it = iter(tensors)
        flat = [next(it) if is_t else other for is_t, other in zip(self.out_is_tensor, self.out_other)]
        return pytree.tree_unflatten(flat, self.out_spec)

    @contextlib.contextmanager
    def recompute_context(self):
        with contextlib.ExitStack() as stack:
            if self.mode is not None and running_mode() is None:
                stack.enter_context(self.mode)
            stack.enter_context(torch.random.fork_rng(devices=list(self.rng[1]), device_type=self.rng[2]))
            torch.set_rng_state(self.rng[0])
            for device, state in self.rng[1].items():
                _device_module(self.rng[2]).set_rng_state(state, device)
            for device_type, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def _autocast_state() -> dict:
    state = {}
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        state[device_type] = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return state


def _device_module(device_type: str):
    return getattr(torch, device_type)


def _rng_state(leaves: list) -> tuple:
    cuda_devices = sorted({t.device.index for t in leaves if isinstance(t, Tensor) and t.is_cuda})
    states = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}
    return torch.get_rng_state(), states, "cuda"


def offload_block_inputs(block: nn.Module) -> None:
    """Make ``block`` (a transformer block, before FSDP wraps it) checkpoint itself with its
    differentiable inputs in host memory (see the module docstring)."""
    original = block.forward

    def offloaded_forward(*args, **kwargs):
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            if torch.compiler.is_compiling():
                raise NotImplementedError(
                    "activation_checkpointing='offload' runs eagerly only; use 'full' with torch.compile"
                )
            return original(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        grad_positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
        if not grad_positions:
            return original(*args, **kwargs)
        call = _BlockCall(original, grad_positions, leaves, spec)
        params = [p for p in block.parameters() if p.requires_grad]
        outputs = _OffloadedBlock.apply(call, *(leaves[i] for i in grad_positions), *params)
        return call.rebuild(outputs)

    block.forward = offloaded_forward
