"""The demo job: Ulysses attention on P local gloo ranks, checked against one process.

Prints the max relative error of the output and of dq/dk/dv, the collectives each rank issued,
and the bytes each rank sent (counted from the collectives) next to the theoretical minimum.
Exits non-zero when either check fails.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..comm_counter import CollectiveCounter
from ..inputs import local_slice
from ..layout import UlyssesLayout

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@dataclass
class DemoConfig:
    """Shapes of the demo run (defaults: GQA with fewer kv heads than ranks, causal)."""

    world: int = 4
    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    seq_len: int = 4096
    head_dim: int = 64
    dtype: str = "float64"
    causal: bool = True
    repeats: int = 3
    seed: int = 0


def _inputs(cfg: DemoConfig):
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    q = torch.randn(cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim, generator=gen, dtype=dtype)
    k = torch.randn(cfg.batch, cfg.kv_heads, cfg.seq_len, cfg.head_dim, generator=gen, dtype=dtype)
    v = torch.randn(cfg.batch, cfg.kv_heads, cfg.seq_len, cfg.head_dim, generator=gen, dtype=dtype)
    grad_out = torch.randn(cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim, generator=gen, dtype=dtype)
    return q, k, v, grad_out


def _rank_demo(ctx, cfg: DemoConfig):
    from ..attention import ulysses_attention

    # every rank draws the same global inputs from the seed and keeps its tokens
    q, k, v, grad_out = (local_slice(t, ctx.rank, ctx.world, cfg.seq_len, dim=2) for t in _inputs(cfg))
    kwargs = dict(is_causal=cfg.causal, enable_gqa=cfg.heads != cfg.kv_heads, seq_len=cfg.seq_len)
    fwd_times, bwd_times = [], []
    for i in range(cfg.repeats):
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        with CollectiveCounter() as counter:
            t0 = time.perf_counter()
            out = ulysses_attention(ql, kl, vl, ctx.group, **kwargs)
            t1 = time.perf_counter()
            forward = (dict(counter.counts()), counter.bytes_sent())
            counter.reset()
            out.backward(grad_out)
            t2 = time.perf_counter()
            backward = (dict(counter.counts()), counter.bytes_sent())
        fwd_times.append(t1 - t0)
        bwd_times.append(t2 - t1)
    return dict(
        out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, forward=forward, backward=backward,
        fwd_s=statistics.median(fwd_times), bwd_s=statistics.median(bwd_times),
    )


def run_demo(cfg: DemoConfig, out=sys.stdout) -> bool:
    """Run the demo; print the report to ``out``; return True when every check passes."""
    from .rank_group import RankGroup

    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    say(f"ulysses-dtensor demo: {asdict(cfg)}")
    say(f"[1/3] starting {cfg.world} gloo ranks ...")
    t0 = time.perf_counter()
    with RankGroup(cfg.world, call_timeout_s=1800) as ranks:
        say(f"[2/3] Ulysses attention forward+backward on {cfg.world} ranks ({cfg.repeats} repeats) ...")
        results = ranks.run(_rank_demo, cfg)
    say(f"[3/3] single-process reference ({time.perf_counter() - t0:.1f} s so far) ...")
    q, k, v, grad_out = _inputs(cfg)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    t1 = time.perf_counter()
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=cfg.causal, enable_gqa=cfg.heads != cfg.kv_heads)
    ref.backward(grad_out)
    ref_s = time.perf_counter() - t1

    ok = True
    tol = TOLERANCE[cfg.dtype]
    errors = {}
    for name, want in (("out", ref), ("dq", ref_in[0].grad), ("dk", ref_in[1].grad), ("dv", ref_in[2].grad)):
        got = torch.cat([r[name] for r in results], dim=2)
        errors[name] = ((got - want).abs().max() / want.abs().max()).item()
    ok &= max(errors.values()) <= tol
    say(
        f"\nmax relative error vs single process ({cfg.dtype}, tolerance {tol:g}): "
        + "  ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )

    layout = UlyssesLayout.build(cfg.batch, cfg.heads, cfg.kv_heads, cfg.seq_len, cfg.head_dim, cfg.world)
    size = DTYPES[cfg.dtype].itemsize
    say("\nper rank   collectives (fwd | bwd)       bytes sent fwd: counted / minimum      bwd: counted / minimum")
    for rank, r in enumerate(results):
        (fc, fb), (bc, bb) = r["forward"], r["backward"]
        fmin, bmin = layout.forward_elements_sent(rank) * size, layout.backward_elements_sent(rank) * size
        ok &= fb == fmin and bb == bmin and fc == bc == ({"all_to_all": 2} if cfg.world > 1 else {})
        say(
            f"rank {rank}    {_counts(fc):>10} | {_counts(bc):<10}   {fb:>14,} / {fmin:<14,}  {bb:>14,} / {bmin:<14,}"
        )
    megatron = 4 * cfg.batch * cfg.seq_len * cfg.heads * cfg.head_dim * size * (cfg.world - 1) // cfg.world
    say(
        f"\nfor scale: Megatron-SP (all-gather + reduce-scatter of the {cfg.heads}-head activations) "
        f"would send ~{megatron:,} bytes per rank per forward"
    )
    fwd = max(r["fwd_s"] for r in results)
    bwd = max(r["bwd_s"] for r in results)
    say(f"time (median, slowest rank): forward {fwd * 1e3:.1f} ms, backward {bwd * 1e3:.1f} ms; "
        f"one process: forward+backward {ref_s * 1e3:.1f} ms (timings are indicative; see benchmarks/)")
    say("\nRESULT: " + ("OK - exact and minimal" if ok else "FAILED"))
    return ok


def _counts(c: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"
