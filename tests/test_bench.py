"""The benchmark suite's smoke run (``ulysses-dtensor bench --quick``) on real gloo ranks.

No timing is asserted. What is checked can fail: every implementation has its rows; the bytes
the CollectiveCounter saw match each scheme's own formula on every rank (ours: the Ulysses
minimum exactly, also for GQA with H_kv < P and uneven N); the all-gather baseline sends more
than ours at P=4; and every implementation's outputs and gradients equal one process's, so the
comparison is between correct implementations.
"""

from __future__ import annotations

import json
import math

import pytest

from ulysses_dtensor.tools.bench.baselines import IMPLEMENTATIONS, deepspeed_available
from ulysses_dtensor.tools.bench.report import write_outputs
from ulysses_dtensor.tools.bench.suite import BenchConfig, run_suite

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def report(ranks4):
    return run_suite(BenchConfig(quick=True, sections="attention,model,bytes"), ranks=ranks4)


def _entries(report, section, world=None):
    return [e for e in report["results"] if e["section"] == section and (world is None or e["world"] == world)]


@pytest.mark.parametrize("section", ["attention", "model"])
def test_every_implementation_has_rows(report, section):
    (entry,) = _entries(report, section, world=4)
    expected = set(IMPLEMENTATIONS) - (set() if deepspeed_available() else {"deepspeed"})
    assert set(entry["rows"]) == expected
    if not deepspeed_available():
        assert "not importable" in entry["skipped"]["deepspeed"]
    for row in entry["rows"].values():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["peak_bytes"] > 0
    (single,) = _entries(report, section, world=1)
    assert set(single["rows"]) == {"single"} and single["rows"]["single"]["bytes_sent"] == 0


def test_ours_sends_exactly_the_minimum(report):
    cases = [e for e in report["results"] if e["world"] > 1]
    assert {e.get("label") for e in _entries(report, "bytes")} == {
        "MHA", "GQA H_kv=2 < P=4", "uneven N", "2 heads / 1 kv head, P=4 > H",
    }
    for entry in cases:
        for name in ("ours", "ours_compiled", "hybrid", "ring"):
            if name in entry["rows"]:
                row = entry["rows"][name]
                assert row["bytes_sent_per_rank"] == row["theory_bytes_per_rank"], (entry["section"], name)
                assert row["bytes_ratio"] == 1.0 and row["bytes_sent"] > 0


def test_baselines_send_their_own_volume_and_allgather_more_than_ours(report):
    for entry in _entries(report, "attention", 4) + _entries(report, "model", 4) + _entries(report, "bytes"):
        rows = entry["rows"]
        for name in ("allgather_kv", "dtensor", "deepspeed"):
            if name in rows:  # dtensor: its all-gather volume, P x an all-to-all's
                assert rows[name]["bytes_sent_per_rank"] == rows[name]["theory_bytes_per_rank"], (entry, name)
        if "deepspeed" in rows:  # the counter sees DeepSpeed's eager c10d all-to-alls
            assert rows["deepspeed"]["bytes_sent"] == rows["ours"]["bytes_sent"]
    (mha,) = [e for e in _entries(report, "bytes") if e["label"] == "MHA"]
    assert mha["rows"]["allgather_kv"]["bytes_sent"] == 2 * mha["rows"]["ours"]["bytes_sent"]
    (attention,) = _entries(report, "attention", 4)
    assert attention["rows"]["allgather_kv"]["bytes_sent"] > attention["rows"]["ours"]["bytes_sent"]
    assert attention["rows"]["dtensor"]["collectives"] == {"all_gather": 8}
    assert attention["rows"]["ours"]["collectives"] == {"all_to_all": 4}


def test_every_implementation_matches_one_process(report):
    for entry in report["results"]:
        for name, row in entry["rows"].items():
            errors = [row[k] for k in ("max_abs_err", "loss_err", "grad_err") if k in row]
            assert errors, (entry["section"], name)
            assert max(errors) <= FP32_TOL, (entry["section"], entry.get("label"), name, errors)


def test_outputs_written(report, tmp_path):
    paths, text = write_outputs(report, str(tmp_path))
    assert {p.rsplit("/", 1)[-1] for p in paths} >= {"bench.json", "bench.md", "time_vs_n.png", "bytes_vs_p.png"}
    assert json.loads((tmp_path / "bench.json").read_text())["results"]
    assert "bytes ÷ minimum, ours, GQA H_kv=2 < P=4" in text and "| 4 | 512 | ours |" in text


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown sections"):
        BenchConfig(sections="attention,speed")


def _rank_overlap_bound(ctx):
    return _load_benchmark("overlap_bound")._rank_measure(ctx, [1], 1)


def test_overlap_bound_script_measures_every_case(ranks4):
    """benchmarks/overlap_bound.py's per-rank measurement (smoke: 1 MiB, 1 repetition)."""
    for rows in ranks4.run(_rank_overlap_bound, world=2, timeout_s=120):
        (row,) = rows
        assert row["mib"] == 1 and min(row["comm_ms"], row["compute_ms"], row["overlapped_ms"]) > 0, row
        # a timing ratio: one noisy repetition can put it anywhere, so only its presence is checked
        assert math.isfinite(row["hidden"]) and row["cpu_per_wall_comm"] > 0, row


def _load_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke_step_args(ctx, modes: list[str]) -> dict:
    """Options of a GPT step benchmark (``bench.step_args``) for a smoke run: N=64, one step."""
    return {"seq_len": 64, "sp": ctx.world, "steps": 1, "rounds": 1, "dim": 32, "layers": 1, "heads": 2, "kv_heads": 1,
            "modes": modes}


def _rank_compile_overhead(ctx):
    from ulysses_dtensor.tools.bench.measure import unpin
    from ulysses_dtensor.compile import enable_comm_overlap

    module = _load_benchmark("compile_overhead")
    args = _smoke_step_args(ctx, ["eager", "compiled_fx_pass"])
    try:
        return module._rank_bench(ctx, args)
    finally:  # process-wide settings: back to the defaults for later tests
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = False
        unpin()
        enable_comm_overlap("inductor")


def test_compile_overhead_script_measures_every_mode(ranks4):
    """benchmarks/compile_overhead.py's per-rank measurement (smoke: N=64, one step per mode)."""
    for r in ranks4.run(_rank_compile_overhead, world=2, timeout_s=600):
        assert r["modes"] == ["eager", "compiled_fx_pass"]
        assert r["eager"]["exchange_ms"] > 0 and r["eager"]["step_ms_median"] > 0, r["eager"]
        compiled = r["compiled_fx_pass"]
        assert compiled["collective_ms"] > 0 and compiled["wait_ms"] > 0 and compiled["layout_kernels_ms"] > 0, compiled


def _rank_propagation_overhead(ctx):
    from ulysses_dtensor.tools.bench.measure import unpin

    module = _load_benchmark("propagation_overhead")
    args = _smoke_step_args(ctx, ["propagation", "local"])
    try:
        return module._rank_bench(ctx, args)
    finally:
        unpin()


def test_propagation_overhead_script_measures_both_paths(ranks4):
    """benchmarks/propagation_overhead.py (smoke: N=64): both paths send the same bytes and
    reach the same loss."""
    for r in ranks4.run(_rank_propagation_overhead, world=2, timeout_s=600):
        prop, local = r["propagation"], r["local"]
        assert prop["step_ms_median"] > 0 and local["step_ms_median"] > 0
        assert prop["bytes_sent"] == local["bytes_sent"] > 0, (prop, local)
        assert abs(r["losses"]["propagation"] - r["losses"]["local"]) <= 1e-5 * abs(r["losses"]["local"])


def _rank_memory_stack(ctx):
    module = _load_benchmark("memory_stack")
    args = dict(cap_mib=40, sp=ctx.world, vocab=4096, dim=32, ffn=64, layers=1, heads=4, kv_heads=2,
                loss_chunk_tokens=32, start=64, resolution=64, factors=[4], steps=1)
    return module._rank_bench(ctx, args)


def test_memory_stack_script_measures_both_stacks(ranks4):
    """benchmarks/memory_stack.py's per-rank measurement (smoke: a 40 MiB cap, small vocab):
    today's longest N is bracketed by its measurements, the stack fits 4× that N, and its peak
    grows less per token."""
    for r in ranks4.run(_rank_memory_stack, world=2, timeout_s=900):
        today = {p["n"]: p["device_peak"] for p in r["results"]["today"]}
        n = r["longest_today"]
        assert today[n] <= 40 * 2**20 and any(m > n and peak > 40 * 2**20 for m, peak in today.items()), today
        stack = {p["n"]: p["device_peak"] for p in r["results"]["stack"]}
        assert stack[4 * n] <= 40 * 2**20, stack
        assert stack[4 * n] - stack[n] < today[n] - today[min(today)], (stack, today)
        assert r["step_s"]["stack"] > 0 and r["step_s"]["today"] > 0
