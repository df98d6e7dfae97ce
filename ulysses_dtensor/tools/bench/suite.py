"""The benchmark suite behind ``ulysses-dtensor bench``: which cases run, in what order, and the
summary of each (slowest rank per repetition, then the median over repetitions).

Sections (``--sections``, comma-separated):

* ``attention``: one attention layer, forward + backward, N x P x implementation.
* ``model``: one training step (forward + backward) of ``llama.Llama``, N x P x implementation.
* ``bytes``: bytes sent ÷ minimum for ours on MHA, GQA with H_kv < P and uneven N; ours vs the
  all-gather baseline at P=4 (small shapes: exact counts need no long runs).
* ``versus``: the acceptance timings: ours vs DeepSpeed at P=2 on two shapes, GQA H_kv < P vs
  the one-process ideal, and the full-model parallel efficiency at sp=2.
* ``memory``: the longest trainable sequence per rank under a memory cap, P=1 vs P=4.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from ..rank_group import RankGroup
from ..llama import LlamaConfig
from .baselines import IMPLEMENTATIONS, AttentionShape, deepspeed_available
from .measure import attention_case
from .model_step import model_case, model_peak_bytes

SECTIONS = ("attention", "model", "bytes", "versus", "memory")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


@dataclass
class BenchConfig:
    """Options of ``ulysses-dtensor bench``. Defaults: the full suite (about 15 min on a
    2-core machine); ``quick``: a smoke run of every section on tiny shapes (under a minute)."""

    out: str = field(default="benchmarks/results", metadata={"help": "directory for JSON, markdown and PNGs"})
    quick: bool = field(default=False, metadata={"help": "smoke run: tiny shapes (overriding the size options), 2 repetitions"})
    sections: str = field(default=",".join(SECTIONS), metadata={"help": "comma-separated: " + ",".join(SECTIONS)})
    reps: int = field(default=5, metadata={"help": "timed repetitions per row (median reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed runs per row before timing"})
    worlds: str = field(default="1,2,4", metadata={"help": "sequence-parallel degrees P"})
    attn_seq_lens: str = field(default="2048,8192,32768", metadata={"help": "attention-layer sequence lengths"})
    attn_heads: int = 4
    attn_kv_heads: int = 4
    attn_head_dim: int = 16
    model_seq_lens: str = field(default="1024,4096", metadata={"help": "full-model sequence lengths"})
    model_dim: int = 128
    model_layers: int = 2
    model_heads: int = 8
    model_kv_heads: int = 4
    check_up_to: int = field(default=2048, metadata={"help": "check outputs against one process up to this N"})
    memory_cap_mib: float = field(default=96.0, metadata={"help": "per-rank cap of the memory-scaling search"})
    efficiency_seq_len: int = field(default=8192, metadata={"help": "N of the sp=2 parallel-efficiency step"})

    def __post_init__(self) -> None:
        if self.quick:  # compilation dominates a smoke run: P=1 and P=4 only, few compiled rows
            self.reps, self.warmup = min(self.reps, 2), min(self.warmup, 1)
            self.worlds, self.attn_seq_lens, self.model_seq_lens = "1,4", "512", "256"
            self.model_dim, self.check_up_to = 64, 4096
            self.memory_cap_mib, self.efficiency_seq_len = 6.0, 512
        unknown = set(self.sections.split(",")) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    def model_config(self, seq_len: int) -> LlamaConfig:
        return LlamaConfig(dim=self.model_dim, n_layers=self.model_layers, n_heads=self.model_heads,
                           n_kv_heads=self.model_kv_heads, max_seq_len=seq_len)


class Log:
    """One line per finished case, with the elapsed time (the suite runs for minutes)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str, case: bool = True) -> None:
        self.done += case
        stamp = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.0f}s]" if case else " " * 16
        print(f"{stamp} {text}", flush=True)


def summarize(per_rank: list[dict]) -> dict:
    """Rows of every rank -> one row: times (slowest rank per repetition), max bytes, max peak."""
    first = per_rank[0]
    rows = {}
    for name in first["rows"]:
        ranks = [r["rows"][name] for r in per_rank]
        per_rep = [max(ts) for ts in zip(*(r["times_s"] for r in ranks))]
        row = {
            "time_s_median": statistics.median(per_rep) if per_rep else None,
            "time_s_min": min(per_rep) if per_rep else None,
            "time_s_max": max(per_rep) if per_rep else None,
            "times_s": per_rep,
            "bytes_sent_per_rank": [r["bytes_sent"] for r in ranks],
            "theory_bytes_per_rank": [r["theory_bytes"] for r in ranks],
            "bytes_sent": max(r["bytes_sent"] for r in ranks),
            "theory_bytes": max(r["theory_bytes"] for r in ranks),
            "collectives": ranks[0]["collectives"],
        }
        row["bytes_ratio"] = row["bytes_sent"] / row["theory_bytes"] if row["theory_bytes"] else None
        for key in ("peak_bytes", "other_bytes"):
            if key in ranks[0]:
                row[key] = max(r[key] for r in ranks)
        for key in ("max_abs_err", "loss_err", "grad_err"):
            if key in ranks[0]:
                row[key] = max(r[key] for r in ranks)
        rows[name] = row
    return {"skipped": first["skipped"], "rows": rows}


def _impls(world: int) -> list[str]:
    # With one rank every implementation is SDPA on the whole sequence: run the plain one.
    return ["single"] if world == 1 else list(IMPLEMENTATIONS)


def _short(row: dict) -> str:
    t = row["time_s_median"]
    text = f"{t * 1e3:9.1f} ms" if t is not None else "    (untimed)"
    text += f"  sent {row['bytes_sent'] / 2**20:8.3f} MiB"
    if row.get("bytes_ratio"):
        text += f" (x{row['bytes_ratio']:.2f} of its minimum)"
    if "peak_bytes" in row:
        text += f"  peak {row['peak_bytes'] / 2**20:7.2f} MiB"
    return text


def _record(log: Log, results: list, entry: dict, summary: dict) -> None:
    entry.update(summary)
    results.append(entry)
    what = {k: v for k, v in entry.items() if k in ("section", "world", "seq_len", "shape", "label")}
    log(" ".join(f"{k}={v}" for k, v in what.items()))
    for name, reason in summary["skipped"].items():
        log(f"  {name:14s} skipped: {reason}", case=False)
    for name, row in summary["rows"].items():
        log(f"  {name:14s} {_short(row)}", case=False)


def run_suite(cfg: BenchConfig, ranks: RankGroup | None = None) -> dict:
    """Run the selected sections on ``ranks`` (spawned here if None); returns the report dict."""
    sections = cfg.sections.split(",")
    worlds = _ints(cfg.worlds)
    if not deepspeed_available():
        print("note: deepspeed is not importable; its rows are skipped (pip install deepspeed)", flush=True)
    own = ranks is None
    if own:
        # compile times differ between ranks on a loaded machine: generous collective timeout
        ranks = RankGroup(max(worlds + [4]), call_timeout_s=3600, collective_timeout_s=1800)
    report: dict = {"config": asdict(cfg), "deepspeed": deepspeed_available(), "results": [], "memory": None}
    plan = _plan(cfg, sections, worlds)
    log = Log(len(plan) + ("memory" in sections))
    try:
        for entry, fn, args, kwargs, world in plan:
            per_rank = ranks.run(fn, *args, world=world, **kwargs)
            _record(log, report["results"], entry, summarize(per_rank))
        if "memory" in sections:
            report["memory"] = memory_scaling(cfg, ranks, log)
    finally:
        if own:
            ranks.close()
    return report


def _plan(cfg: BenchConfig, sections: list[str], worlds: list[int]) -> list[tuple]:
    """(entry, rank function, args, kwargs, world) of every case, in run order."""
    plan = []
    timing = {"reps": cfg.reps, "warmup": cfg.warmup}
    if "attention" in sections:
        for world in worlds:
            for n in _ints(cfg.attn_seq_lens):
                shape = AttentionShape(1, cfg.attn_heads, cfg.attn_kv_heads, n, cfg.attn_head_dim)
                entry = {"section": "attention", "world": world, "seq_len": n, "shape": asdict(shape)}
                plan.append((entry, attention_case, (shape, _impls(world)),
                             {**timing, "check": n <= cfg.check_up_to}, world))
    if "model" in sections:
        for world in worlds:
            for n in _ints(cfg.model_seq_lens):
                entry = {"section": "model", "world": world, "seq_len": n, "model": asdict(cfg.model_config(n))}
                plan.append((entry, model_case, (cfg.model_config(n), n, _impls(world)),
                             {**timing, "check": n <= cfg.check_up_to}, world))
    if "bytes" in sections:
        n = 256 if cfg.quick else 4096
        for label, shape in (
            ("MHA", AttentionShape(1, 8, 8, n, 16)),
            ("GQA H_kv=2 < P=4", AttentionShape(1, 8, 2, n, 16)),
            ("uneven N", AttentionShape(1, 8, 8, n - 1, 16)),
        ):
            entry = {"section": "bytes", "label": label, "world": 4, "seq_len": shape.seq_len, "shape": asdict(shape)}
            plan.append((entry, attention_case, (shape, ["ours", "allgather_kv", "dtensor", "deepspeed"]),
                         {"reps": 0, "warmup": 0, "check": True, "memory": False}, 4))
        # sp beyond the head count (docs/hybrid.md): plain Ulysses leaves ranks idle, the hybrid
        # and pure ring keep every rank busy; bytes next to all-gather K/V
        shape = AttentionShape(1, 2, 1, n, 16)
        entry = {"section": "bytes", "label": "2 heads / 1 kv head, P=4 > H", "world": 4, "seq_len": n,
                 "shape": asdict(shape)}
        plan.append((entry, attention_case, (shape, ["ours", "hybrid", "ring", "allgather_kv"]),
                     {"reps": 0, "warmup": 0, "check": True, "memory": False}, 4))
    if "versus" in sections:
        plan += _versus_plan(cfg)
    return plan


def _versus_plan(cfg: BenchConfig) -> list[tuple]:
    """The acceptance timings (float32, causal, 1 thread and 1 core per rank)."""
    plan = []
    reps = max(cfg.reps, 2 if cfg.quick else 7)
    timing = {"reps": reps, "warmup": cfg.warmup}
    ours = ["ours"] if cfg.quick else ["ours", "ours_compiled"]  # (the smoke run skips compiling)
    shapes = [("ds_small", AttentionShape(1, 16, 16, 2048, 32)), ("ds_large", AttentionShape(1, 8, 8, 16384, 64))]
    if cfg.quick:
        shapes = [("ds_small", AttentionShape(1, 4, 4, 512, 16))]
    for label, shape in shapes:
        entry = {"section": "versus", "label": f"{label}: ours vs DeepSpeed", "world": 2, "seq_len": shape.seq_len,
                 "shape": asdict(shape)}
        # the large shape takes seconds a step: eager only there, to keep the suite near 15 minutes
        impls = ["ours", "deepspeed"] if shape.seq_len > 8192 else [*ours, "deepspeed"]
        plan.append((entry, attention_case, (shape, impls),
                     {**timing, "memory": False}, 2))
    # GQA with H_kv < P (DeepSpeed refuses): ours at P=2 vs one process (ideal: T_single / 2)
    gqa = AttentionShape(1, 8, 1, 512 if cfg.quick else 8192, 32)
    for world, impls in ((1, ["single"]), (2, ours)):
        entry = {"section": "versus", "label": "GQA H_kv=1 < P=2 vs one process", "world": world,
                 "seq_len": gqa.seq_len, "shape": asdict(gqa)}
        plan.append((entry, attention_case, (gqa, impls), {**timing, "memory": False}, world))
    # Full-model step: sp=2 (1 thread each) vs one process with 2 threads, alternated twice.
    n = cfg.efficiency_seq_len
    model = LlamaConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, max_seq_len=n)
    half = {"reps": max(reps // 2, 1), "warmup": cfg.warmup, "memory": False}
    for round_ in range(1 if cfg.quick else 2):
        for world, impls, threads in ((1, ["single"], 2), (2, ours, 1)):
            entry = {"section": "versus", "label": f"efficiency round {round_ + 1}", "world": world, "seq_len": n,
                     "model": asdict(model), "threads_per_rank": threads}
            plan.append((entry, model_case, (model, n, impls), {**half, "threads": threads}, world))
    return plan


def memory_scaling(cfg: BenchConfig, ranks: RankGroup, log: Log) -> dict:
    """Longest N whose training step (ours, eager) peaks at or under the cap on every rank, for
    P=1 and P=4: doubling from a small N, then bisection to within 1/16 of the bracket (N a
    multiple of 64·P so shards stay even)."""
    cap = int(cfg.memory_cap_mib * 2**20)
    out = {"cap_bytes": cap, "model": asdict(cfg.model_config(0)), "probes": {}}
    for world in (1, 4):
        step = 64 * world
        probes: dict[int, int] = {}

        def peak(n: int) -> int:
            if n not in probes:
                probes[n] = max(ranks.run(model_peak_bytes, cfg.model_config(n), n, world=world))
                log(f"  memory P={world} N={n}: peak {probes[n] / 2**20:.2f} MiB "
                    f"({'fits' if probes[n] <= cap else 'over'} the {cfg.memory_cap_mib:g} MiB cap)", case=False)
            return probes[n]

        lo, hi = 0, step
        while peak(hi) <= cap:
            lo, hi = hi, hi * 2
        while hi - lo > max(step, hi // 16):
            mid = (lo + hi) // 2 // step * step
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if peak(mid) <= cap else (lo, mid)
        out["probes"][world] = probes
        out[f"longest_p{world}"] = lo
        out[f"peak_at_longest_p{world}"] = probes.get(lo)
    out["ratio"] = out["longest_p4"] / out["longest_p1"] if out["longest_p1"] else None
    log(f"memory: longest N under {cfg.memory_cap_mib:g} MiB/rank: P=1 {out['longest_p1']}, "
        f"P=4 {out['longest_p4']} (ratio {out['ratio'] or 0:.2f})")
    return out


def main_entry(cfg: BenchConfig) -> int:
    """Run, write the outputs, print the markdown; the ``bench`` subcommand."""
    from .report import write_outputs

    t0 = time.perf_counter()
    report = run_suite(cfg)
    report["duration_s"] = time.perf_counter() - t0
    paths, markdown = write_outputs(report, cfg.out)
    print()
    print(markdown)
    for path in paths:
        print(f"wrote {path}")
    print(f"bench: done in {report['duration_s']:.0f} s", file=sys.stderr)
    return 0
