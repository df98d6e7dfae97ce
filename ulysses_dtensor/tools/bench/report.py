"""The suite's outputs: ``bench.json`` (everything), ``bench.md`` (tables and the acceptance
figures) and PNG plots (time vs N, bytes vs P, memory vs N; matplotlib, if installed)."""

from __future__ import annotations

import json
import os

MIB = 2**20
# distinct markers: several implementations send the same bytes and their lines coincide
MARKERS = {"single": "*", "ours": "o", "ours_compiled": "x", "allgather_kv": "s", "dtensor": "^", "deepspeed": "D"}


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.1f}"


def _mib(n) -> str:
    return "—" if n is None else f"{n / MIB:,.3f}"


def _spread(row: dict) -> str:
    if row["time_s_median"] is None:
        return "—"
    return f"{_ms(row['time_s_min'])} – {_ms(row['time_s_max'])}"


def _error(row: dict) -> str:
    if "max_abs_err" in row:
        return f"{row['max_abs_err']:.1e}"
    if "grad_err" in row:
        return f"{max(row['loss_err'], row['grad_err']):.1e}"
    return "—"


TABLE_HEADER = [
    "| P | N | implementation | time ms (median) | min – max | sent MiB/rank | its minimum MiB | ratio | other MiB/rank "
    "| peak MiB/rank | max err vs 1 process |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def results_table(results: list[dict], section: str) -> list[str]:
    lines = list(TABLE_HEADER)
    for entry in (e for e in results if e["section"] == section):
        for name, row in entry["rows"].items():
            ratio = "—" if row["bytes_ratio"] is None else f"{row['bytes_ratio']:.2f}"
            lines.append(
                f"| {entry['world']} | {entry['seq_len']:,} | {name} | {_ms(row['time_s_median'])} | {_spread(row)} "
                f"| {_mib(row['bytes_sent'])} | {_mib(row['theory_bytes'])} | {ratio} | {_mib(row.get('other_bytes'))} "
                f"| {_mib(row.get('peak_bytes'))} "
                f"| {_error(row)} |"
            )
        for name, reason in entry["skipped"].items():
            lines.append(f"| {entry['world']} | {entry['seq_len']:,} | {name} | skipped: {reason} | | | | | | | |")
    return lines


def acceptance(report: dict) -> list[str]:
    """The issue's acceptance figures from whatever sections ran."""
    results = report["results"]
    lines = []
    for entry in (e for e in results if e["section"] == "bytes"):
        ours = entry["rows"]["ours"]
        exact = ours["bytes_sent_per_rank"] == ours["theory_bytes_per_rank"]
        lines.append(f"- bytes ÷ minimum, ours, {entry['label']} (N={entry['seq_len']}, P=4): "
                     f"{ours['bytes_ratio']:.2f} ({'exact on every rank' if exact else 'NOT exact'}; target 1.00)")
        if entry["label"] == "MHA" and "allgather_kv" in entry["rows"]:
            ag = entry["rows"]["allgather_kv"]
            lines.append(f"- ours ÷ all-gather-K/V bytes at P=4 (MHA): {ours['bytes_sent'] / ag['bytes_sent']:.2f} (target ≤ 0.50)")
    for entry in (e for e in results if e["section"] == "versus" and "DeepSpeed" in e.get("label", "")):
        rows, s = entry["rows"], entry["shape"]
        what = f"B={s['batch']} N={s['seq_len']} H={s['heads']} D={s['head_dim']}"
        if "deepspeed" in rows and rows["deepspeed"]["time_s_median"]:
            ds = rows["deepspeed"]["time_s_median"]
            for name in ("ours", "ours_compiled"):
                if name in rows:
                    lines.append(f"- {name} ÷ DeepSpeed, attention fwd+bwd, P=2, {what}: "
                                 f"{rows[name]['time_s_median'] / ds:.2f} ({_ms(rows[name]['time_s_median'])} vs {_ms(ds)} ms)")
        else:
            lines.append(f"- ours vs DeepSpeed, {what}: DeepSpeed not measured ({entry['skipped'].get('deepspeed')})")
    gqa = [e for e in results if e["section"] == "versus" and e.get("label", "").startswith("GQA")]
    single = next((e["rows"]["single"]["time_s_median"] for e in gqa if "single" in e["rows"]), None)
    for entry in gqa:
        for name in ("ours", "ours_compiled"):
            if name in entry["rows"] and single:
                t = entry["rows"][name]["time_s_median"]
                lines.append(f"- GQA H_kv=1 < P=2 (DeepSpeed refuses it), {name}: {_ms(t)} ms vs one process "
                             f"{_ms(single)} ms; ideal (one process ÷ 2) ÷ ours = {single / 2 / t:.2f}")
    eff = [e for e in results if e["section"] == "versus" and e.get("label", "").startswith("efficiency")]
    if eff:
        single = [t for e in eff if "single" in e["rows"] for t in e["rows"]["single"]["times_s"]]
        for name in ("ours", "ours_compiled"):
            sp2 = [t for e in eff if name in e["rows"] for t in e["rows"][name]["times_s"]]
            if single and sp2:
                t1, t2 = _median(single), _median(sp2)
                lines.append(f"- full-model step N={eff[0]['seq_len']}, one process × 2 threads {_ms(t1)} ms vs sp=2 "
                             f"({name}) {_ms(t2)} ms: parallel efficiency T_single ÷ T_sp2 = {t1 / t2:.2f} (target ≥ 0.85)")
    mem = report.get("memory")
    if mem:
        ratio = "— (P=1 fits no N: raise --memory-cap-mib)" if mem["ratio"] is None else f"{mem['ratio']:.2f}"
        lines.append(f"- longest trainable N under {mem['cap_bytes'] / MIB:g} MiB per rank: P=1 {mem['longest_p1']:,}, "
                     f"P=4 {mem['longest_p4']:,}; ratio {ratio} (target ≥ 3.5)")
    return lines


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def _describe(entry: dict) -> str:
    """The shape of an entry's case in one line."""
    if "shape" in entry:
        s = entry["shape"]
        return f"B={s['batch']} N={s['seq_len']:,} H={s['heads']} H_kv={s['kv_heads']} D={s['head_dim']}"
    m = entry["model"]
    threads = entry.get("threads_per_rank", 1)
    return (f"Llama dim={m['dim']} layers={m['n_layers']} H={m['n_heads']} H_kv={m['n_kv_heads']} "
            f"N={entry['seq_len']:,}, {threads} thread(s) per rank")


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# ulysses-dtensor bench",
        "",
        f"float32, causal, CPU/gloo, 1 thread and 1 core per rank (P=4 on fewer than 4 cores shares cores: "
        f"compare implementations within a row group, not across P). Median of {cfg['reps']} interleaved "
        f"repetitions (slowest rank per repetition) after {cfg['warmup']} warm-up. DeepSpeed "
        f"{'measured' if report['deepspeed'] else 'not installed: its rows are skipped'}. "
        f"Suite time: {report.get('duration_s', 0):.0f} s.",
        "",
        "## Acceptance figures",
        "",
        *acceptance(report),
    ]
    for section, title in (("attention", "Attention layer, forward + backward"),
                           ("model", "Training step of llama.Llama, forward + backward"),
                           ("bytes", "Bytes against each scheme's minimum (P=4)"),
                           ("versus", "Acceptance timings")):
        if any(e["section"] == section for e in report["results"]):
            lines += ["", f"## {title}", ""]
            if section in ("bytes", "versus"):
                for entry in (e for e in report["results"] if e["section"] == section):
                    lines.append(f"- {entry['label']}: P={entry['world']}, {_describe(entry)}")
                lines.append("")
            else:
                first = next(e for e in report["results"] if e["section"] == section)
                lines += [f"Shape: {_describe(first)} (N varies as listed).", ""]
            lines += results_table(report["results"], section)
    mem = report.get("memory")
    if mem:
        lines += ["", "## Memory scaling (ours, eager training step)", "",
                  "| P | N probed | peak MiB/rank | fits |", "|---|---|---|---|"]
        for world, probes in mem["probes"].items():
            for n, peak in sorted(probes.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {world} | {int(n):,} | {_mib(peak)} | {'yes' if peak <= mem['cap_bytes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (after a note) when matplotlib is not
    installed (the ``plot`` extra): benchmarks write their JSON and markdown either way."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path) -> None:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plots(report: dict, out_dir: str) -> list[str]:
    """time vs N and memory vs N (attention layer, largest P) and bytes vs P (largest N)."""
    plt = pyplot()
    if plt is None:
        return []

    attn = [e for e in report["results"] if e["section"] == "attention"]
    if not attn:
        return []
    paths = []
    top_world = max(e["world"] for e in attn)
    top_n = max(e["seq_len"] for e in attn)
    for key, ylabel, fname in (("time_s_median", "fwd+bwd time (s)", "time_vs_n.png"),
                               ("peak_bytes", "peak tensor memory per rank (MiB)", "memory_vs_n.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for world in sorted({e["world"] for e in attn}):
            if key == "peak_bytes" and world not in (1, top_world):
                continue
            entries = sorted((e for e in attn if e["world"] == world), key=lambda e: e["seq_len"])
            for name in entries[0]["rows"]:
                pts = [(e["seq_len"], e["rows"][name].get(key)) for e in entries if name in e["rows"]]
                pts = [(n, y / (MIB if key == "peak_bytes" else 1)) for n, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=MARKERS.get(name, "o"), label=f"{name} P={world}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, fname))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    entries = sorted((e for e in attn if e["seq_len"] == top_n and e["world"] > 1), key=lambda e: e["world"])
    names = sorted({n for e in entries for n in e["rows"]})
    for name in names:
        pts = [(e["world"], e["rows"][name]["bytes_sent"] / MIB) for e in entries if name in e["rows"]]
        ax.plot(*zip(*pts), marker=MARKERS.get(name, "o"), fillstyle="none", label=f"{name} (counted)")
    if entries and "ours" in entries[0]["rows"]:
        pts = [(e["world"], e["rows"]["ours"]["theory_bytes"] / MIB) for e in entries if "ours" in e["rows"]]
        ax.plot(*zip(*pts), ls="--", color="black", label="Ulysses minimum")
    ax.set_xlabel("P (ranks)")
    ax.set_ylabel(f"MiB sent per rank, fwd+bwd, N={top_n}")
    ax.set_xticks(sorted({e["world"] for e in entries}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "bytes_vs_p.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_outputs(report: dict, out_dir: str) -> tuple[list[str], str]:
    """Write bench.json, bench.md and the plots into ``out_dir``; returns (paths, markdown)."""
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(report)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(text)
    return paths + plots(report, out_dir), text
