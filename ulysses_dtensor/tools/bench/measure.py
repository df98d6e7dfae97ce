"""What runs on each rank: one case of the benchmark, measured three ways.

For every implementation of a case, in this order:

1. a checked run: outputs and input gradients against one process holding every token
   (optional: costs a full-sequence attention), bytes and collectives under
   :class:`~ulysses_dtensor.comm_counter.CollectiveCounter`;
2. a memory run: the peak of live tensor bytes under torch's ``MemTracker`` (inputs included);
3. warm-up runs (compilation happens here), then ``reps`` timed runs, *interleaved*: every
   repetition runs every implementation once, in an order rotated per repetition, so a slow
   phase of a shared machine hits all of them alike.

Counting and memory tracking are dispatch modes that slow a run down, so they never overlap
the timed runs. Each rank times its own runs; the suite takes the slowest rank per repetition.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from ...comm_counter import CollectiveCounter
from .baselines import ATTENTION_KINDS, AttentionShape, build, local_tokens, theoretical_bytes, unsupported_reason

Tensor = torch.Tensor


def pin_to_core(rank: int) -> None:
    """One core per rank: ranks sharing cores skew each other and the skew shows up as 'wait'."""
    if hasattr(os, "sched_setaffinity") and os.cpu_count():
        os.sched_setaffinity(0, {rank % os.cpu_count()})


def unpin() -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count():
        os.sched_setaffinity(0, set(range(os.cpu_count())))


def peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Peak bytes of live tensors (CPU) while ``step`` runs, tensors alive before it included."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        step()
    return int(sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))


def interleaved_times(steps: dict[str, Callable[[], None]], group, *, reps: int, warmup: int,
                      on_rep: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each step per repetition, round-robin over steps, start rotated per repetition.

    A barrier precedes every timed run so all ranks start it together."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            dist.barrier(group)
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        if on_rep is not None:
            on_rep(rep)
    return times


def fresh_compile_state() -> None:
    """Forget earlier compilations. A process that compiled for another world size would
    recompile (possibly with dynamic shapes) while a fresh one compiles static: different graphs
    on different ranks can issue different collectives and hang the group."""
    torch._dynamo.reset()


def count_collectives(run: Callable[[], object], name: str) -> tuple[object, dict]:
    """Run once under a CollectiveCounter; split the bytes into this implementation's attention
    collectives and everything else."""
    with CollectiveCounter() as counter:
        result = run()
    attention = sum(counter.bytes_sent(kind) for kind in ATTENTION_KINDS[name])
    return result, {
        "bytes_sent": attention,
        "other_bytes": counter.bytes_sent() - attention,
        "collectives": dict(counter.counts()),
    }


def _global_inputs(shape: AttentionShape, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, ...]:
    """q, k, v, grad_out of the whole sequence in model layout (B, N, H, D); equal on every rank."""
    gen = torch.Generator().manual_seed(seed)
    b, n, d = shape.batch, shape.seq_len, shape.head_dim
    sizes = ((b, n, shape.heads, d), (b, n, shape.kv_heads, d), (b, n, shape.kv_heads, d), (b, n, shape.heads, d))
    return tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes)


def attention_case(ctx, shape: AttentionShape, impls: list[str], *, dtype: str = "float32", reps: int = 5,
                   warmup: int = 1, check: bool = False, memory: bool = True, pin: bool = True) -> dict:
    """Measure ``impls`` on ``shape`` on this rank (a :class:`RankGroup` function).

    Returns ``{"skipped": {impl: reason}, "rows": {impl: {...}}}`` where a row holds this rank's
    ``times_s`` (per repetition), ``bytes_sent``, ``collectives``, ``theory_bytes``,
    ``peak_bytes`` and, with ``check``, ``max_abs_err`` (outputs and q/k/v gradients).
    """
    fresh_compile_state()
    if pin:
        pin_to_core(ctx.rank)
    torch_dtype = getattr(torch, dtype)
    rank, world = ctx.rank, ctx.world
    q_all, k_all, v_all, grad_all = _global_inputs(shape, torch_dtype)
    mine = local_tokens(shape.seq_len, world, rank)
    inputs = [t[:, mine].contiguous() for t in (q_all, k_all, v_all)]
    grad_out = grad_all[:, mine].contiguous()

    skipped = {name: reason for name in impls if (reason := unsupported_reason(name, shape, world))}
    runnable = [name for name in impls if name not in skipped]
    fns = {name: build(name, shape, ctx.group) for name in runnable}

    def fwd_bwd(fn) -> tuple[Tensor, list[Tensor]]:
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    rows: dict[str, dict] = {}
    reference = _reference(shape, q_all, k_all, v_all, grad_all, mine) if check else None
    for name in runnable:
        fn = fns[name]
        fwd_bwd(fn)  # first call outside the counter: compilation and one-time set-up
        (out, grads), row = count_collectives(lambda: fwd_bwd(fn), name)
        row = {
            **row,
            "theory_bytes": theoretical_bytes(name, shape, world, rank, inputs[0].element_size()),
        }
        if reference is not None:
            row["max_abs_err"] = max(float((a - b).abs().max()) for a, b in zip([out, *grads], reference))
        if memory:
            row["peak_bytes"] = peak_tensor_bytes(lambda: fwd_bwd(fn))
        rows[name] = row

    steps = {name: (lambda fn=fns[name]: fwd_bwd(fn)) for name in runnable}
    times = interleaved_times(steps, ctx.group, reps=reps, warmup=warmup)
    for name in runnable:
        rows[name]["times_s"] = times[name]
    if pin:
        unpin()
    return {"skipped": skipped, "rows": rows}


def _reference(shape: AttentionShape, q, k, v, grad_out, mine: slice) -> list[Tensor]:
    """This rank's slice of the one-process output and q/k/v gradients."""
    from .baselines import sdpa_model_layout

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sdpa_model_layout(*leaves, is_causal=shape.causal, enable_gqa=shape.gqa)
    out.backward(grad_out)
    return [t[:, mine] for t in (out.detach(), *(x.grad for x in leaves))]
