"""Can an all-to-all be hidden behind compute on this machine? The bound behind two benchmark targets.

    python benchmarks/overlap_bound.py            # ~1 min on an idle 2-core machine

Two gloo ranks, each pinned to its own core with one compute thread (the benchmarks' setting).
For each message size, interleaved and repeated (medians of ``--reps``):

* ``comm``: a blocking ``all_to_all_single`` of that many bytes per rank;
* ``compute``: a matmul loop of about the same duration;
* ``overlapped``: the all-to-all issued asynchronously, the matmul loop, then the wait: what
  pipelining or Inductor's collective reordering would do at best.

``hidden`` = (comm + compute − overlapped) / comm is the share of the transfer that overlap hides
(1 = free communication, 0 = none). ``cpu/wall`` is the process's CPU time (all threads) per wall
second during the blocking all-to-all: ≈ 1 means the transfer keeps this rank's core busy, so
there is no idle core for it to run on while the core computes. Writes JSON and markdown to
``benchmarks/results/overlap_bound.*``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ulysses_dtensor.tools.bench.measure import pin_to_core, unpin  # noqa: E402
from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402

MiB = 1 << 20


def _matmul_loop(a: torch.Tensor, repeats: int) -> None:
    for _ in range(repeats):
        torch.mm(a, a)


def _rank_measure(ctx, sizes_mib: list[int], reps: int) -> list[dict]:
    threads = torch.get_num_threads()
    pin_to_core(ctx.rank)
    torch.set_num_threads(1)
    try:
        return _measure(ctx, sizes_mib, reps)
    finally:  # a test's rank group runs other work afterwards
        unpin()
        torch.set_num_threads(threads)


def _measure(ctx, sizes_mib: list[int], reps: int) -> list[dict]:
    a = torch.randn(384, 384)
    rows = []
    for size in sizes_mib:
        send = torch.randn(size * MiB // 4)
        recv = torch.empty_like(send)

        def comm():
            dist.all_to_all_single(recv, send, group=ctx.group)

        # calibrate the matmul loop to the all-to-all's duration (same count on both ranks)
        dist.barrier(group=ctx.group)
        t0 = time.perf_counter()
        comm()
        comm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _matmul_loop(a, 10)
        per_mm = torch.tensor((time.perf_counter() - t0) / 10)
        dist.all_reduce(per_mm, op=dist.ReduceOp.MAX, group=ctx.group)
        repeats = max(1, int(comm_s / per_mm.item()))

        def compute():
            _matmul_loop(a, repeats)

        def overlapped():
            work = dist.all_to_all_single(recv, send, group=ctx.group, async_op=True)
            _matmul_loop(a, repeats)
            work.wait()

        times = {"comm": [], "compute": [], "overlapped": []}
        cpu_per_wall = []
        for i in range(reps + 1):  # the first round is warm-up
            order = [("comm", comm), ("compute", compute), ("overlapped", overlapped)]
            order = order[i % 3:] + order[: i % 3]  # rotate, so no case always runs first
            for name, fn in order:
                dist.barrier(group=ctx.group)
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if i:
                    times[name].append(wall * 1e3)
                    if name == "comm":
                        cpu_per_wall.append(cpu / wall)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "rank": ctx.rank,
            "mib": size,
            "comm_ms": med["comm"],
            "compute_ms": med["compute"],
            "overlapped_ms": med["overlapped"],
            "sequential_ms": med["comm"] + med["compute"],
            "hidden": (med["comm"] + med["compute"] - med["overlapped"]) / med["comm"],
            "comm_mb_per_s": size * MiB / (med["comm"] / 1e3) / 1e6,
            "cpu_per_wall_comm": statistics.median(cpu_per_wall),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", default="2,8,32", help="bytes per rank per all-to-all (MiB, comma-separated)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    print(f"overlap_bound: 2 ranks, sizes {sizes} MiB, {args.reps} reps each ...", flush=True)
    with RankGroup(2, call_timeout_s=1800) as ranks:
        per_rank = ranks.run(_rank_measure, sizes, args.reps, timeout_s=1800)
    rows = [row for rank_rows in per_rank for row in rank_rows]
    lines = [
        "| MiB per rank | rank | all-to-all ms | MB/s | cpu/wall during it | matmul ms | overlapped ms | back to back ms | hidden |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mib"], r["rank"])):
        lines.append(
            f"| {r['mib']} | {r['rank']} | {r['comm_ms']:.1f} | {r['comm_mb_per_s']:.0f} | {r['cpu_per_wall_comm']:.2f} "
            f"| {r['compute_ms']:.1f} | {r['overlapped_ms']:.1f} | {r['sequential_ms']:.1f} | {r['hidden']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap_bound.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    (args.out / "overlap_bound.md").write_text(table + "\n")
    print(f"wrote {args.out / 'overlap_bound.json'} and .md")


if __name__ == "__main__":
    main()
