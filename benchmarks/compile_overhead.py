"""Eager vs torch.compile step time of a sequence-parallel GPT, and the sequence-parallel overhead.

    python benchmarks/compile_overhead.py --seq-len 8192 --sp 2 --steps 5

Each of ``sp`` local gloo ranks (1 thread each, pinned to its own core) trains
``ulysses_dtensor/tools/llama.py`` (forward + backward, float32) on its N/sp tokens, in each mode
of ``--modes``. FSDP off, so only Ulysses communicates: eager; compiled (``torch.compile(model)``,
Inductor with its scheduler overlap passes, the default); compiled_fx_pass (plus our post-grad
overlap pass, ``UlyssesConfig(compile_overlap="fx_pass")``). FSDP2 on (the default path):
eager_fsdp; compiled_blocks_fsdp (``UlyssesConfig(compile=True)``: each block compiled with
fullgraph=True before FSDP2 wraps it). Per mode: the median step time over ``--steps``
steps and, over ``--steps`` profiled steps, the time per step in the sequence-parallel machinery,
each the median over ``--rounds`` rounds (every round runs every mode, starting mode rotated):

* eager: the ``ulysses_dtensor::seq_to_head`` / ``head_to_seq`` ranges (pack copies, all-to-all,
  wait, unpack copies) — the whole overhead;
* compiled: the all-to-all and its waits, plus the Inductor kernels that write or read the
  exchange buffers (their names carry ``cat`` / ``slice_scatter`` / ``copy``).

The waits of the loss's two scalar all-reduces are reported apart, in both modes: they are not
Ulysses machinery (eager's ranges never contained them), and they absorb the skew between ranks.

Writes JSON, markdown and a PNG (step time split into SP overhead and the rest, per mode and
rank) to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ulysses_dtensor.tools.llama import Llama as GPT, LlamaConfig as GPTConfig  # noqa: E402
from ulysses_dtensor.tools.bench.measure import interleaved_times, pin_to_core  # noqa: E402
from ulysses_dtensor.tools.bench.step_args import parse_step_args  # noqa: E402
from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402
from ulysses_dtensor.tools.bench.report import pyplot, save_figure  # noqa: E402

# compiled: Inductor with its scheduler overlap passes (the default); compiled_fx_pass: plus our
# post-grad overlap pass (UlyssesConfig(compile_overlap="fx_pass"))
MODES = ("eager", "compiled", "compiled_fx_pass", "eager_fsdp", "compiled_blocks_fsdp")


def _profile_breakdown(prof, compiled: bool) -> dict[str, float]:
    """Milliseconds per category from one profiled step (this rank's main thread)."""
    out = {"exchange_ms": 0.0, "collective_ms": 0.0, "wait_ms": 0.0, "layout_kernels_ms": 0.0, "loss_wait_ms": 0.0,
           "fsdp_collective_ms": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        name = event.key
        scalar = event.input_shapes in ([[]], [])
        if name.startswith("ulysses_dtensor::"):
            out["exchange_ms"] += event.cpu_time_total / 1e3
        elif compiled and "cpp_fused" in name:  # Inductor kernels (some carry "all_to_all" in their name)
            if any(k in name for k in ("cat", "slice_scatter", "copy", "clone", "all_to_all")):
                out["layout_kernels_ms"] += event.self_cpu_time_total / 1e3
        elif any(k in name for k in ("all_gather", "allgather", "reduce_scatter", "reducescatter")):
            out["fsdp_collective_ms"] += event.self_cpu_time_total / 1e3  # FSDP2's, not SP overhead
        elif "all_to_all" in name or "alltoall" in name:
            out["collective_ms"] += event.self_cpu_time_total / 1e3
        elif "wait_tensor" in name and scalar:  # the loss's all-reduces: not Ulysses (eager leaves them out too)
            out["loss_wait_ms"] += event.self_cpu_time_total / 1e3
        elif "wait_tensor" in name:
            out["wait_ms"] += event.self_cpu_time_total / 1e3
    out["sp_overhead_ms"] = (
        out["exchange_ms"] if not compiled else out["collective_ms"] + out["wait_ms"] + out["layout_kernels_ms"]
    )
    return out


def _rank_bench(ctx, args: dict) -> dict:
    import ulysses_dtensor as U
    from torch.distributed.device_mesh import DeviceMesh

    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel shows in the profile
    pin_to_core(ctx.rank)
    mesh = DeviceMesh.from_group(ctx.group, "cpu", mesh_dim_names=("sp",))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, args["seq_len"]), generator=gen)
    targets = torch.randint(0, 256, (1, args["seq_len"]), generator=gen)
    steps, warmup_s = {}, {}
    for mode in args["modes"]:
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=256, max_seq_len=args["seq_len"], dim=args["dim"], n_layers=args["layers"],
                        n_heads=args["heads"], n_kv_heads=args["kv_heads"])
        overlap = "fx_pass" if mode == "compiled_fx_pass" else "inductor"
        # the overlap setting is process-wide and read when Inductor compiles: warm up right away
        fsdp = mode.endswith("_fsdp")
        config = U.UlyssesConfig(fsdp=fsdp, compile_overlap=overlap, compile=mode == "compiled_blocks_fsdp")
        model = U.parallelize_module(GPT(cfg), mesh, config)
        run = torch.compile(model) if mode in ("compiled", "compiled_fx_pass") else model

        def step(run=run):
            _, loss = run(tokens, targets)
            loss.backward()

        t0 = time.perf_counter()
        for _ in range(2):  # warm-up (and compile)
            step()
        warmup_s[mode], steps[mode] = time.perf_counter() - t0, step
    # Rounds over the modes, round-robin with the starting mode rotated (interleaved_times, a
    # barrier before each run): slow drifts of this shared machine hit every mode alike. Each
    # figure is the median over the rounds.
    modes, n = list(args["modes"]), args["steps"]
    times = interleaved_times(steps, ctx.group, reps=args["rounds"] * n, warmup=0)
    profiles: dict[str, list[dict]] = {mode: [] for mode in modes}
    top_events = None

    def profiled(mode):
        def run():
            nonlocal top_events
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(n):
                    steps[mode]()
            compiled = mode.startswith("compiled")
            profiles[mode].append({k: v / n for k, v in _profile_breakdown(prof, compiled=compiled).items()})
            if ctx.rank == 0 and mode == "compiled":
                top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
                top_events = [(e.key, round(e.self_cpu_time_total / 1e3 / n, 2)) for e in top]
        return run

    interleaved_times({mode: profiled(mode) for mode in modes}, ctx.group, reps=args["rounds"], warmup=0)
    results = {"modes": modes, "compiled_top_events": top_events}
    for mode in modes:
        rounds = [{"step_ms_median": statistics.median(times[mode][r * n:(r + 1) * n]) * 1e3, **profile}
                  for r, profile in enumerate(profiles[mode])]
        results[mode] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results[mode]["warmup_s"] = warmup_s[mode]
        results[mode]["rounds"] = rounds
    return results


def _plot(per_rank: list[dict], path: Path) -> None:
    """Per mode and rank: median step time as a bar, its SP-overhead part stacked at the bottom."""
    plt = pyplot()
    if plt is None:
        return

    labels, overhead, rest = [], [], []
    for mode in per_rank[0]["modes"]:
        for rank, r in enumerate(per_rank):
            labels.append(f"{mode}\nrank {rank}")
            overhead.append(r[mode]["sp_overhead_ms"])
            rest.append(max(r[mode]["step_ms_median"] - r[mode]["sp_overhead_ms"], 0.0))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(labels, overhead, label="SP overhead (exchange copies, all-to-all, wait)", color="tab:red")
    ax.bar(labels, rest, bottom=overhead, label="everything else", color="tab:blue", alpha=0.6)
    ax.set_ylabel("ms per step (median)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, path)


def main() -> None:
    args = parse_step_args(__doc__, MODES, 8192, ROOT / "benchmarks" / "results")
    print(f"compile_overhead: {args}", flush=True)
    with RankGroup(args["sp"], call_timeout_s=3600) as ranks:
        per_rank = ranks.run(_rank_bench, {k: v for k, v in args.items() if k != "out"})
    modes = per_rank[0]["modes"]
    # per-step figures, averaged over the ranks (the step time is the slowest rank's)
    summary = {
        mode: {
            k: (max if k == "step_ms_median" else statistics.mean)(r[mode][k] for r in per_rank)
            for k in per_rank[0][mode] if k != "rounds"
        }
        for mode in modes
    }
    report = {"config": {k: v for k, v in args.items() if k != "out"}, "per_rank": per_rank, "slowest_rank": summary}
    args["out"].mkdir(parents=True, exist_ok=True)
    (args["out"] / "compile_overhead.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Eager vs compiled, GPT N={args['seq_len']}, sp={args['sp']} (ms per step, median of {args['rounds']} rounds; step: slowest rank, rest: mean over ranks)",
        "",
        "| | step (median) | SP overhead | in all-to-all | in all-to-all wait | layout kernels | loss all-reduce wait (not SP overhead) | FSDP2 collectives |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        m = summary[mode]
        layout = "(in overhead)" if mode.startswith("eager") else f"{m['layout_kernels_ms']:.1f}"
        lines.append(f"| {mode} | {m['step_ms_median']:.0f} | {m['sp_overhead_ms']:.1f} | {m['collective_ms']:.1f} | "
                     f"{m['wait_ms']:.1f} | {layout} | {m['loss_wait_ms']:.1f} | {m['fsdp_collective_ms']:.1f} |")
    lines.append("")
    for mode in modes:
        base = "eager_fsdp" if mode.endswith("_fsdp") else "eager"
        if mode.startswith("compiled") and base in summary:
            m, e = summary[mode], summary[base]
            lines.append(f"{mode} / {base}: step {m['step_ms_median'] / e['step_ms_median']:.2f}, "
                         f"SP overhead {m['sp_overhead_ms'] / max(e['sp_overhead_ms'], 1e-9):.2f}  ")
    (args["out"] / "compile_overhead.md").write_text("\n".join(lines) + "\n")
    _plot(per_rank, args["out"] / "compile_overhead.png")
    print("\n".join(lines))
    print("top compiled events (rank 0, ms per step):", per_rank[0].get("compiled_top_events"))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
