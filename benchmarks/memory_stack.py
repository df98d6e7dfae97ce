"""Longest trainable sequence at a fixed per-rank memory cap: the memory stack vs today's.

    python benchmarks/memory_stack.py --cap-mib 320 --sp 4

Each of ``sp`` local gloo ranks trains a random-init Hugging Face ``LlamaForCausalLM`` (vocab
32768, float32, FSDP2 over the sp ranks, AdamW) on its N/sp tokens with ``parallelize_module``:

* ``today``: the longest-sequence setting before issue 16: ``activation_checkpointing="full"``
  and the full-logits loss (``chunked_loss=False``);
* ``loss``: issue 16's first part alone: the chunked loss (the default) with full checkpointing;
* ``stack``: ``activation_checkpointing="offload"``, ``tiled_tokenwise=True``, ``head_chunks`` =
  the query heads a rank holds, and the chunked loss.

Memory is the peak of live tensors per rank over one whole training step (forward, backward,
optimizer), tracked by torch's ``MemTracker`` (parameters, gradients, Adam state, activations,
temporaries), minus the offloaded block inputs: on a GPU those sit in host memory, on this
CPU-only machine host and device are the same memory, so the tracker sees them and we subtract
the bytes ``offload.offloaded_bytes()`` reports at each moment (the host bytes at the peak are
reported next to it). The longest N of ``today`` under the cap is searched (doubling, then
bisection to ``--resolution`` tokens); ``loss`` and ``stack`` are measured at the same lengths and
at 8× and 16× that N (their own limits are further out: the search would take CPU hours of
attention), and each peak's growth per token (a least-squares line through the points from
1024 tokens on) extrapolates where it would reach the cap. Step time at today's longest N:
median of ``--steps`` steps, slowest rank. Writes JSON, markdown and a PNG (peak vs N, every
configuration) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402
from ulysses_dtensor.tools.bench.report import pyplot, save_figure  # noqa: E402

MIB = 2**20


def _model(args: dict):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args["vocab"], hidden_size=args["dim"], intermediate_size=args["ffn"],
        num_hidden_layers=args["layers"], num_attention_heads=args["heads"], num_key_value_heads=args["kv_heads"],
        max_position_embeddings=2**20,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").train()


def _stack_config(name: str, args: dict):
    import ulysses_dtensor as U

    if name == "today":
        return U.UlyssesConfig(activation_checkpointing="full", chunked_loss=False)
    if name == "loss":
        return U.UlyssesConfig(activation_checkpointing="full", loss_chunk_tokens=args["loss_chunk_tokens"])
    heads_per_rank = -(-args["heads"] // args["sp"])
    return U.UlyssesConfig(activation_checkpointing="offload", tiled_tokenwise=True, head_chunks=heads_per_rank,
                           loss_chunk_tokens=args["loss_chunk_tokens"])


class _Setup:
    """One parallelized model and optimizer per stack, reused for every N."""

    def __init__(self, ctx, name: str, args: dict):
        from torch.distributed.device_mesh import DeviceMesh

        import ulysses_dtensor as U

        mesh = DeviceMesh.from_group(ctx.group, "cpu", mesh_dim_names=("sp",))
        self.model = U.parallelize_module(_model(args), mesh, _stack_config(name, args))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.vocab = args["vocab"]

    def step(self, n: int) -> float:
        gen = torch.Generator().manual_seed(n)
        tokens = torch.randint(0, self.vocab, (1, n), generator=gen)
        loss = self.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def _device_peak(setup: _Setup, n: int) -> dict:
    """Peak live tensor bytes of one step: total, and total minus host-resident offload copies."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    from ulysses_dtensor.offload import offloaded_bytes

    class DevicePeak(MemTracker):
        device_peak = 0
        host_at_peak = 0

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            total = sum(snap.get(_TOTAL_KEY, 0) for snap in self._curr_mem_snap.values())
            host = offloaded_bytes()
            if total - host > self.device_peak:
                self.device_peak, self.host_at_peak = total - host, host

    setup.step(n)  # warm-up at this length (lazy FSDP state, Adam state exist from the first one)
    tracker = DevicePeak()
    tracker.track_external(setup.model, setup.opt)
    with tracker:
        setup.step(n)
    total = sum(tracker.get_tracker_snapshot("peak")[dev][_TOTAL_KEY] for dev in tracker.get_tracker_snapshot("peak"))
    return {"device_peak": tracker.device_peak, "host_at_peak": tracker.host_at_peak, "tracked_peak": total}


def _rank_bench(ctx, args: dict) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    cap = args["cap_mib"] * MIB

    def peak(setup, n) -> dict:
        m = _device_peak(setup, n)
        worst = torch.tensor([m["device_peak"], m["host_at_peak"], m["tracked_peak"]], dtype=torch.float64)
        dist.all_reduce(worst, dist.ReduceOp.MAX, group=ctx.group)  # the rank with the largest peak
        out = {"n": n, "device_peak": int(worst[0]), "host_at_peak": int(worst[1]), "tracked_peak": int(worst[2])}
        if ctx.rank == 0:
            print(f"  {setup.name:>5} N={n:>7,}: {out['device_peak'] / MIB:8.1f} MiB "
                  f"(host {out['host_at_peak'] / MIB:.1f} MiB)", flush=True)
        return out

    results = {"today": [], "loss": [], "stack": []}
    setups = {}
    for name in results:
        setups[name] = _Setup(ctx, name, args)
        setups[name].name = name
        setups[name].step(args["start"])

    # today's longest N: doubling, then bisection
    today = setups["today"]
    lo, hi, n = 0, None, args["start"]
    while hi is None:
        r = peak(today, n)
        results["today"].append(r)
        if r["device_peak"] <= cap:
            lo, n = n, 2 * n
        else:
            hi = n
    while hi - lo > args["resolution"]:
        mid = (lo + hi) // 2
        r = peak(today, mid)
        results["today"].append(r)
        lo, hi = (mid, hi) if r["device_peak"] <= cap else (lo, mid)
    longest_today = lo

    # the others at the same lengths, then at 8× and 16× today's longest
    for name in ("loss", "stack"):
        for r in sorted(results["today"], key=lambda r: r["n"]):
            results[name].append(peak(setups[name], r["n"]))
        for factor in args["factors"]:
            results[name].append(peak(setups[name], factor * longest_today))

    # step time at today's longest N, interleaved
    times = {name: [] for name in setups}
    for _ in range(args["steps"]):
        for name, setup in setups.items():
            dist.barrier(group=ctx.group)
            t0 = time.perf_counter()
            setup.step(longest_today)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, dist.ReduceOp.MAX, group=ctx.group)
            times[name].append(float(dt))
    return {"results": results, "longest_today": longest_today,
            "step_s": {name: statistics.median(t) for name, t in times.items()}, "times": times}


def _line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares slope and intercept of (N, bytes)."""
    if len(points) < 2:
        return 0.0, 0.0
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return slope, my - slope * mx


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"today": "today: full checkpointing, full-logits loss", "loss": "chunked loss + full checkpointing",
              "stack": "memory stack: + offload, tiled, head chunks"}
    for name, color in (("today", "tab:red"), ("loss", "tab:orange"), ("stack", "tab:blue")):
        points = sorted(report["results"][name], key=lambda r: r["n"])
        ax.plot([r["n"] for r in points], [r["device_peak"] / MIB for r in points], "o-", color=color, label=labels[name])
    ax.axhline(report["config"]["cap_mib"], color="gray", ls="--", label=f"cap {report['config']['cap_mib']} MiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global sequence length N (tokens)")
    ax.set_ylabel("peak live tensors per rank (MiB)")
    ax.set_title(f"HF Llama, vocab {report['config']['vocab']}, sp={report['config']['sp']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap-mib", type=int, default=320, help="per-rank cap on live tensors (MiB)")
    p.add_argument("--sp", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=176)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--loss-chunk-tokens", type=int, default=128)
    p.add_argument("--start", type=int, default=512, help="first N of the search")
    p.add_argument("--resolution", type=int, default=128, help="bisection stops within this many tokens")
    p.add_argument("--factors", type=int, nargs="*", default=[8, 16], help="the stack is measured at these × today's N")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stack")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    args = {k: v for k, v in vars(a).items() if k != "out"}
    print(f"memory_stack: {args}", flush=True)
    t0 = time.perf_counter()
    with RankGroup(a.sp, call_timeout_s=7200, collective_timeout_s=1800) as ranks:
        out = ranks.run(_rank_bench, args)[0]
    cap = a.cap_mib * MIB
    fits_stack = [r["n"] for r in out["results"]["stack"] if r["device_peak"] <= cap]
    longest_stack_measured = max(fits_stack) if fits_stack else 0
    growth = {name: _line([(r["n"], r["device_peak"]) for r in rs if r["n"] >= 1024]) for name, rs in out["results"].items()}
    extrapolated = {name: int((cap - b) / m) if m > 0 else None for name, (m, b) in growth.items()}
    report = {"config": args, **out, "longest_stack_measured": longest_stack_measured,
              "ratio_measured": longest_stack_measured / out["longest_today"],
              "bytes_per_token": {k: m for k, (m, _) in growth.items()}, "extrapolated_longest": extrapolated,
              "step_time_ratio": out["step_s"]["stack"] / out["step_s"]["today"], "wall_s": time.perf_counter() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "memory_stack.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Longest trainable N at {a.cap_mib} MiB per rank: memory stack vs today (HF Llama, vocab {a.vocab}, "
        f"d={a.dim}, ffn={a.ffn}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, sp={a.sp}, float32, FSDP2, AdamW)",
        "",
        f"- today's longest N under the cap: **{out['longest_today']:,}** tokens (bisection to {a.resolution})",
        f"- the stack fits **{longest_stack_measured:,}** tokens (measured; "
        f"**{report['ratio_measured']:.0f}×** today's), its own limit not searched",
        f"- step time at N = {out['longest_today']:,} (median of {a.steps}, slowest rank): today "
        f"{out['step_s']['today'] * 1e3:.0f} ms, chunked loss {out['step_s']['loss'] * 1e3:.0f} ms, stack "
        f"{out['step_s']['stack'] * 1e3:.0f} ms (**{report['step_time_ratio']:.2f}×** today's)",
        "- peak growth per token and where the line reaches the cap (extrapolated): "
        + "; ".join(f"{name} {report['bytes_per_token'][name]:,.0f} B/token -> "
                    f"{extrapolated[name]:,} tokens" for name in ("today", "loss", "stack") if extrapolated[name]),
        "",
        "| N | today peak MiB | chunked loss peak MiB | stack peak MiB | stack: host-resident at its peak MiB |",
        "|---|---|---|---|---|",
    ]
    by_n = {name: {r["n"]: r for r in rs} for name, rs in out["results"].items()}
    for n in sorted(by_n["stack"]):
        cells = [f"{by_n[name][n]['device_peak'] / MIB:.1f}" if n in by_n[name] else "–" for name in ("today", "loss", "stack")]
        lines.append(f"| {n:,} | {' | '.join(cells)} | {by_n['stack'][n]['host_at_peak'] / MIB:.1f} |")
    (a.out / "memory_stack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(report, a.out / "memory_stack.png")
    return report


if __name__ == "__main__":
    main()
