"""Hybrid-model sequence mixers under Ulysses: one training step per mixer kind vs one process.

    python benchmarks/mixers.py --seq-len 2048 --sp 2,4 --steps 3

Per kind (Gated DeltaNet: a Qwen3.5 linear-attention layer; Mamba2: a NemotronH mamba layer,
2 B/C groups so sp = 4 has fewer groups than ranks; short convolution: an Lfm2 conv layer), a
one-layer Hugging Face model of that mixer only (random init, float32, hidden 256) trains one
step (forward + backward of the loss) in one process and at each sp on local gloo ranks (FSDP
off, so only the mixer's exchanges and the loss's all-reduces communicate). Reported per row:
median step time (slowest rank), peak live tensor bytes per rank (torch's MemTracker), all-to-all bytes rank 0 sent (counted) next to the documented
minimum (``ChannelExchange.elements_sent`` + ``halo.halo_elements_sent``, docs/mixers.md), and
the loss's relative difference to one process. This machine has 2 cores: sp > 2 oversubscribes
them, so its times show overhead, not speed-up. Writes JSON, markdown and a PNG to ``--out``.
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

from ulysses_dtensor.comm_counter import CollectiveCounter  # noqa: E402
from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402
from ulysses_dtensor.tools.bench.report import pyplot, save_figure  # noqa: E402

KINDS = ("Gated DeltaNet", "Mamba2", "short convolution")
HIDDEN, VOCAB, BATCH = 256, 512, 1


def build(kind: str):
    """A one-layer random-init HF causal LM whose only sequence mixer is ``kind`` (float32)."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "Gated DeltaNet":
        config = T.Qwen3_5TextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=1, layer_types=["linear_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32,
            linear_value_head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8)
        model = T.Qwen3_5ForCausalLM(config)
    elif kind == "Mamba2":
        config = T.NemotronHConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, layers_block_type=["mamba"], ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=32,
            n_groups=2, conv_kernel=4, chunk_size=64)
        model = T.NemotronHForCausalLM(config)
    else:
        config = T.Lfm2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=1,
                              layer_types=["conv"], num_attention_heads=4, num_key_value_heads=2, conv_L_cache=3)
        model = T.Lfm2ForCausalLM(config)
    return model.float()


def minimum_bytes(kind: str, config, group, rank: int, seq_len: int) -> int:
    """The documented minimum all-to-all bytes ``rank`` sends in one forward + backward."""
    import torch.distributed as dist

    from ulysses_dtensor.halo import halo_elements_sent
    from ulysses_dtensor.layout import seq_shard_sizes
    from ulysses_dtensor.mixers import ChannelExchange

    sizes = seq_shard_sizes(seq_len, dist.get_world_size(group))
    if kind == "Gated DeltaNet":
        hv, dv, hk, dk = (config.linear_num_value_heads, config.linear_value_head_dim, config.linear_num_key_heads,
                          config.linear_key_head_dim)
        ex = ChannelExchange.build(group, rank, seq_len, hv, dv, hk)
        exchange = ex.elements_sent(rank, BATCH, [dk, dk], 1, 2)  # q, k grouped; v; g, beta per head
        halo = halo_elements_sent(sizes, config.linear_conv_kernel_dim - 1, rank, BATCH * (2 * hk * dk + hv * dv))
    elif kind == "Mamba2":
        h, dh, g, s = config.mamba_num_heads, config.mamba_head_dim, config.n_groups, config.ssm_state_size
        ex = ChannelExchange.build(group, rank, seq_len, h, dh, g)
        exchange = ex.elements_sent(rank, BATCH, [s, s], 1, 1)  # B, C grouped; x; dt per head
        halo = halo_elements_sent(sizes, config.conv_kernel - 1, rank, BATCH * (h * dh + 2 * g * s))
    else:
        exchange = (0, 0)
        halo = halo_elements_sent(sizes, config.conv_L_cache - 1, rank, BATCH * config.hidden_size)
    return 4 * (sum(exchange) + sum(halo))  # float32


def _rank_step(ctx, kind: str, seq_len: int, steps: int, parallel: bool) -> dict:
    import ulysses_dtensor as U
    from ulysses_dtensor.tools.bench.measure import interleaved_times, peak_tensor_bytes

    model = build(kind)
    if parallel:
        model = U.parallelize_module(model, ctx.mesh(), U.UlyssesConfig(fsdp=False))
    ids = torch.randint(0, VOCAB, (BATCH, seq_len), generator=torch.Generator().manual_seed(1))
    losses = []

    def step():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.item())

    step()  # warm-up (and the one-time checks)
    with CollectiveCounter() as counter:
        step()
    peak = peak_tensor_bytes(step)
    times = interleaved_times({"step": step}, ctx.group, reps=steps, warmup=0)["step"]
    out = {"step_ms": statistics.median(times) * 1e3, "peak_mib": peak / 2**20, "loss": losses[0], "collectives": dict(counter.counts()),
           "all_to_all_bytes": counter.bytes_sent("all_to_all")}
    if parallel:
        out["minimum_bytes"] = minimum_bytes(kind, model.config, ctx.group, ctx.rank, seq_len)
    return out


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted({r["sp"] for r in rows})
    width = 0.8 / len(labels)
    for i, sp in enumerate(labels):
        picked = [r for r in rows if r["sp"] == sp]
        ax.bar([k + i * width for k in range(len(picked))], [r["step_ms"] for r in picked], width,
               label="one process" if sp == 1 else f"sp={sp}")
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(KINDS))], KINDS)
    ax.set_ylabel("ms per step (median, slowest rank)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--sp", default="2,4", help="comma-separated sp degrees (one process is always run)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    sps = [int(s) for s in args.sp.split(",") if s]
    if any(sp < 2 for sp in sps):
        parser.error("--sp degrees must be >= 2 (one process is always measured)")
    t0 = time.perf_counter()
    rows = []
    with RankGroup(max(sps), call_timeout_s=3600) as ranks:
        for kind in KINDS:
            for sp in [1, *sps]:
                print(f"mixers: {kind}, {'one process' if sp == 1 else f'sp={sp}'}, N={args.seq_len}", flush=True)
                per_rank = ranks.run(_rank_step, kind, args.seq_len, args.steps, sp > 1, world=sp)
                rows.append({"kind": kind, "sp": sp, "step_ms": max(r["step_ms"] for r in per_rank),
                             "peak_mib": max(r["peak_mib"] for r in per_rank), **{
                    k: per_rank[0][k] for k in ("loss", "collectives", "all_to_all_bytes", "minimum_bytes") if k in per_rank[0]}})
    reference = {r["kind"]: r["loss"] for r in rows if r["sp"] == 1}
    for r in rows:
        r["loss_rel_diff"] = abs(r["loss"] - reference[r["kind"]]) / abs(reference[r["kind"]])
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"seq_len": args.seq_len, "sp": sps, "steps": args.steps, "hidden": HIDDEN, "batch": BATCH}
    (args.out / "mixers.json").write_text(json.dumps({"config": config, "rows": rows,
                                                      "wall_s": time.perf_counter() - t0}, indent=2))
    lines = [
        f"# Sequence mixers, one training step, N={args.seq_len}, hidden {HIDDEN}, float32 "
        f"(median of {args.steps} steps, slowest rank; 2 CPU cores)",
        "",
        "| mixer | run | step | peak tensors per rank | all-to-all bytes sent (rank 0) | documented minimum | collectives per step | loss vs one process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        colls = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "–"
        minimum = f"{r['minimum_bytes']:,}" if "minimum_bytes" in r else "–"
        run = "one process" if r["sp"] == 1 else f"sp={r['sp']}"
        lines.append(f"| {r['kind']} | {run} | {r['step_ms']:.1f} ms | {r['peak_mib']:.1f} MiB | {r['all_to_all_bytes']:,} | {minimum} | {colls} | "
                     f"{r['loss_rel_diff']:.1e} |")
    (args.out / "mixers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, args.out / "mixers.png")


if __name__ == "__main__":
    main()
