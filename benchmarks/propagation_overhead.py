"""What the propagation path costs: eager DTensor dispatch vs the local-tensor path, per step.

    python benchmarks/propagation_overhead.py --seq-len 4096 --sp 2 --steps 5 --rounds 3

Each of ``sp`` local gloo ranks (one core each) trains ``ulysses_dtensor/tools/llama.py`` (forward +
backward, float32, FSDP off so only Ulysses communicates) on its N/sp tokens, in each mode:

* ``propagation``: the default path, the forward on ``Shard(seq)`` DTensors (``propagation.py``);
* ``local``: ``UlyssesConfig(propagation=False)``, the forward on plain N/sp-token tensors;
* ``compiled``: torch.compile of the model (which runs the local path).

Per mode: the median step time (slowest rank) over the rounds, the collectives and bytes one
step sends (counted), and the propagation path's extra time per step over ``local`` — the eager
DTensor dispatch overhead. Writes JSON, markdown and a PNG to ``--out``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ulysses_dtensor.tools.bench.measure import interleaved_times, pin_to_core  # noqa: E402
from ulysses_dtensor.tools.bench.step_args import parse_step_args  # noqa: E402
from ulysses_dtensor.comm_counter import CollectiveCounter  # noqa: E402
from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402
from ulysses_dtensor.tools.llama import Llama, LlamaConfig  # noqa: E402
from ulysses_dtensor.tools.bench.report import pyplot, save_figure  # noqa: E402

MODES = ("propagation", "local", "compiled")


def _rank_bench(ctx, args: dict) -> dict:
    import ulysses_dtensor as U
    from torch.distributed.device_mesh import DeviceMesh

    pin_to_core(ctx.rank)
    mesh = DeviceMesh.from_group(ctx.group, "cpu", mesh_dim_names=("sp",))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, args["seq_len"]), generator=gen)
    targets = torch.randint(0, 256, (1, args["seq_len"]), generator=gen)
    steps, counts, losses = {}, {}, {}
    for mode in args["modes"]:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, max_seq_len=args["seq_len"], dim=args["dim"], n_layers=args["layers"],
                          n_heads=args["heads"], n_kv_heads=args["kv_heads"])
        config = U.UlyssesConfig(fsdp=False, propagation=mode == "propagation")
        model = U.parallelize_module(Llama(cfg), mesh, config)
        run = torch.compile(model) if mode == "compiled" else model

        def step(run=run, mode=mode):
            _, loss = run(tokens, targets)
            loss.backward()
            losses[mode] = loss.item()

        for _ in range(2):  # warm-up (and compile)
            step()
        with CollectiveCounter() as counter:
            step()
        counts[mode] = {"collectives": dict(counter.counts()), "bytes_sent": counter.bytes_sent()}
        steps[mode] = step
    n = args["steps"]
    times = interleaved_times(steps, ctx.group, reps=args["rounds"] * n, warmup=0)
    out = {"modes": list(args["modes"]), "losses": losses}
    for mode in args["modes"]:
        rounds = [statistics.median(times[mode][r * n:(r + 1) * n]) * 1e3 for r in range(args["rounds"])]
        out[mode] = {"step_ms_median": statistics.median(rounds), "rounds_ms": rounds, **counts[mode]}
    return out


def _plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    modes = list(summary)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(modes, [summary[m]["step_ms_median"] for m in modes], color=["tab:orange", "tab:blue", "tab:green"][: len(modes)])
    ax.set_ylabel("ms per step (median, slowest rank)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, path)


def main() -> None:
    args = parse_step_args(__doc__, MODES, 4096, ROOT / "benchmarks" / "results")
    print(f"propagation_overhead: {args}", flush=True)
    t0 = time.perf_counter()
    with RankGroup(args["sp"], call_timeout_s=3600) as ranks:
        per_rank = ranks.run(_rank_bench, {k: v for k, v in args.items() if k != "out"})
    modes = per_rank[0]["modes"]
    summary = {
        mode: {
            "step_ms_median": max(r[mode]["step_ms_median"] for r in per_rank),
            "collectives": per_rank[0][mode]["collectives"],
            "bytes_sent_rank0": per_rank[0][mode]["bytes_sent"],
            "loss": per_rank[0]["losses"][mode],
        }
        for mode in modes
    }
    report = {"config": {k: v for k, v in args.items() if k != "out"}, "per_rank": per_rank, "summary": summary,
              "wall_s": time.perf_counter() - t0}
    args["out"].mkdir(parents=True, exist_ok=True)
    (args["out"] / "propagation_overhead.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Propagation path vs local path, Llama N={args['seq_len']}, sp={args['sp']}, dim={args['dim']}, "
        f"{args['layers']} layers (median of {args['rounds']} rounds × {args['steps']} steps, slowest rank)",
        "",
        "| mode | step | vs local | collectives per step | bytes sent (rank 0) | loss |",
        "|---|---|---|---|---|---|",
    ]
    local = summary.get("local", {}).get("step_ms_median")
    for mode in modes:
        s = summary[mode]
        ratio = f"{s['step_ms_median'] / local:.3f}×" if local else "–"
        colls = ", ".join(f"{k} {v}" for k, v in sorted(s["collectives"].items()))
        lines.append(f"| {mode} | {s['step_ms_median']:.1f} ms | {ratio} | {colls} | {s['bytes_sent_rank0']:,} | {s['loss']:.6f} |")
    if local and "propagation" in summary:
        extra = summary["propagation"]["step_ms_median"] - local
        lines += ["", f"Eager DTensor dispatch overhead of the propagation path: {extra:+.1f} ms per step."]
    (args["out"] / "propagation_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(summary, args["out"] / "propagation_overhead.png")


if __name__ == "__main__":
    main()
