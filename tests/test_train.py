"""The train job: its task, its exactness across layouts, checkpoint/resume after a kill, its CLI.

Runs go through the real launcher (spawned gloo ranks) at small sizes, in float64, so a layout
change must reproduce the losses to ~1e-10 and the same layout must reproduce them bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace

import pytest
import torch

from helpers import SMALL_TRAIN, small_train_args, train_cli, train_losses
from ulysses_dtensor.tools.data import RetrievalTask, step_generator
from ulysses_dtensor.layout import seq_shard_offsets, seq_shard_sizes
from ulysses_dtensor.tools.train import TrainConfig, build_phases, run_train



def _shard_of(pos: torch.Tensor, seq_len: int, sp: int) -> torch.Tensor:
    starts = torch.tensor(seq_shard_offsets(seq_shard_sizes(seq_len, sp)))
    return torch.searchsorted(starts, pos, right=True) - 1


@pytest.mark.parametrize("seq_len", [48, 64, 100, 128, 1000])
@pytest.mark.parametrize("sp", [2, 4, 8])
def test_every_answer_sits_on_another_shard_than_its_query(seq_len, sp):
    task = RetrievalTask()
    task.check_layout(seq_len, sp)
    tokens, targets = task.batch(6, seq_len, step_generator(0, seq_len * sp))
    for b in range(tokens.shape[0]):
        queries = (targets[b] != -100).nonzero().flatten()
        assert len(queries) == task.queries
        for q in queries.tolist():
            where = (tokens[b] == targets[b, q]).nonzero().flatten()
            where = where[where < q]
            assert len(where) == 1, "each asked record appears exactly once before its query"
            record_key = (targets[b, q] - task.filler - task.keys) // task.values_per_key
            assert tokens[b, q] == task.filler + record_key, "the query token is the record's key"
            assert _shard_of(where, seq_len, sp).item() != _shard_of(torch.tensor([q]), seq_len, sp).item()


def test_batches_are_a_function_of_seed_and_step():
    task = RetrievalTask()
    a = task.batch(2, 256, step_generator(3, 17))
    b = task.batch(2, 256, step_generator(3, 17))
    c = task.batch(2, 256, step_generator(3, 18))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_layout_check_refuses_queries_on_the_records_shard():
    with pytest.raises(ValueError, match="share a shard"):
        RetrievalTask().check_layout(48, 3)  # shard 1 = [16, 32) holds record slot 23 and query 24


def test_auto_curriculum_doubles_to_the_target_length():
    phases = build_phases(TrainConfig(seq_len=8192, dp=2))
    assert [p.seq_len for p in phases] == [128 * 2**i for i in range(7)]
    assert all(p.batch % 2 == 0 and p.batch * p.seq_len >= 2048 for p in phases)


def test_train_is_exact_across_layouts(train_reference, tmp_path):
    """sp=2, dp=1 (the reference) = one process = (dp=2, sp=2) = sp=4, per step, in float64."""
    want = train_losses(train_reference)
    assert want[-1] < want[0]
    for dp, sp in ((1, 1), (2, 2), (1, 4)):
        got = train_losses(run_train(replace(SMALL_TRAIN, dp=dp, sp=sp, out_dir=str(tmp_path / f"{dp}x{sp}"))))
        assert max(abs(g - w) / abs(w) for g, w in zip(got, want)) < 1e-10, (dp, sp)


def test_reference_reports_minimal_all_to_all_and_counted_bytes(train_reference):
    logged = [r for r in train_reference["history"] if "bytes_sent" in r]
    assert logged
    for r in logged:
        assert len(r["bytes_sent"]) == 2 and len(r["peak_mem_mib"]) == 2  # one entry per rank
        for rank in range(2):
            assert r["all_to_all_bytes"][rank] == r["all_to_all_min_bytes"][rank] > 0
            assert r["bytes_sent"][rank] > r["all_to_all_bytes"][rank]  # FSDP's all-gathers and reduce-scatters too
        assert r["collectives"]["all_to_all"] == 4 * 2  # 2 layers × (2 forward + 2 backward)
    assert 0 <= train_reference["eval_accuracy"] <= 1


@pytest.mark.parametrize("mode,all_to_alls", [("selective", 8), ("full", 12)])
def test_activation_checkpointing_is_exact_and_counts_its_minimum(train_reference, tmp_path, mode, all_to_alls):
    """--activation-checkpointing: the reference's losses (float64), and the all-to-all bytes equal
    the minimum, which for "full" includes the recomputed forward exchanges (selective re-runs none)."""
    summary = run_train(replace(SMALL_TRAIN, activation_checkpointing=mode, out_dir=str(tmp_path)))
    want = train_losses(train_reference)
    assert max(abs(g - w) / abs(w) for g, w in zip(train_losses(summary), want)) < 1e-10
    for r in (r for r in summary["history"] if "bytes_sent" in r):
        assert r["all_to_all_bytes"] == r["all_to_all_min_bytes"], r
        assert r["collectives"]["all_to_all"] == all_to_alls  # 2 layers × (2 fwd + 2 bwd [+ 2 recomputed])


def test_compiled_blocks_train_like_eager(train_reference, tmp_path):
    """--compile (UlyssesConfig(compile=True): blocks compiled by Inductor, FSDP2 on): the eager
    reference's losses over the curriculum's two lengths (float64; Inductor reorders float math),
    the all-to-all bytes still the minimum."""
    summary = run_train(replace(SMALL_TRAIN, compile=True, activation_checkpointing="none", out_dir=str(tmp_path)))
    want = train_losses(train_reference)
    assert max(abs(g - w) / abs(w) for g, w in zip(train_losses(summary), want)) < 1e-9
    for r in (r for r in summary["history"] if "bytes_sent" in r):
        assert r["all_to_all_bytes"] == r["all_to_all_min_bytes"], r
        assert r["collectives"]["all_to_all"] == 4 * 2, r


def test_memory_stack_is_exact_and_counts_its_minimum(train_reference, tmp_path):
    """The whole memory stack (offload, tiled MLPs and norms, 2 head chunks of the 2 heads a
    rank holds): the reference's losses, all-to-all bytes = the minimum (the backward re-sends
    q/k/v, the recompute replays the attention outputs: 2 layers × (4 forward + 4 backward))."""
    cfg = replace(SMALL_TRAIN, activation_checkpointing="offload", tiled_tokenwise="yes", head_chunks=2, out_dir=str(tmp_path))
    summary = run_train(cfg)
    want = train_losses(train_reference)
    assert max(abs(g - w) / abs(w) for g, w in zip(train_losses(summary), want)) < 1e-10
    for r in (r for r in summary["history"] if "bytes_sent" in r):
        assert r["all_to_all_bytes"] == r["all_to_all_min_bytes"], r
        assert r["collectives"]["all_to_all"] == 16


def test_memory_stack_auto_follows_the_cap():
    """"auto" options: no cap on CPU gives the cheapest stack; a cap the plain step exceeds gives
    the cheapest that fits it by the planner's estimate."""
    from ulysses_dtensor.tools.data import RetrievalTask
    from ulysses_dtensor.tools.train import resolve_memory_stack

    task = RetrievalTask()
    plain = resolve_memory_stack(replace(SMALL_TRAIN, dtype="float32"), task)
    assert (plain.activation_checkpointing, plain.tiled_tokenwise, plain.head_chunks) == ("none", "no", 1)
    long = replace(SMALL_TRAIN, dtype="float32", seq_len=2**16, curriculum="65536:1", tokens_per_step=2**16, model="small")
    from ulysses_dtensor.tools.planner import estimate
    from ulysses_dtensor.tools.llama import llama_config

    model = llama_config("small", vocab_size=task.vocab_size)
    none = estimate(model, 2**16, 1, 2, ac="none", precision="float32", loss="full").peak
    capped = resolve_memory_stack(replace(long, memory_cap_gib=0.6 * none / 2**30), task)
    assert capped.activation_checkpointing != "none"
    chosen = estimate(model, 2**16, 1, 2, ac=capped.activation_checkpointing, precision="float32", loss="full",
                      tiled=capped.tiled_tokenwise == "yes", head_chunks=capped.head_chunks)
    assert chosen.peak <= 0.6 * none


def test_local_attention_only_sends_no_all_to_all_and_changes_the_result(train_reference, tmp_path):
    summary = run_train(replace(SMALL_TRAIN, local_attention_only=True, out_dir=str(tmp_path)))
    logged = [r for r in summary["history"] if "bytes_sent" in r]
    assert logged and all("all_to_all" not in r["collectives"] and max(r["all_to_all_bytes"]) == 0 for r in logged)
    # same initial model and data, but attention sees less from the first step on
    assert all(abs(a - b) > 1e-6 * abs(b) for a, b in zip(train_losses(summary), train_losses(train_reference)))


def test_killed_run_resumes_exactly_on_the_same_and_another_layout(train_reference, tmp_path):
    """SIGKILL the whole job after its step-4 checkpoint; resume (sp=2 and dp=2 × sp=1): every later
    loss equals the uninterrupted run's (bit for bit on the same layout)."""
    ckpt = tmp_path / "ckpt"
    proc = train_cli(*small_train_args(), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", out=str(tmp_path / "killed"))
    marker = ckpt / "step_000004" / "train_state.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
    proc.wait(30)
    assert marker.exists(), proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-training"
    want = train_losses(train_reference)
    for dp, sp in ((1, 2), (2, 1)):
        resumed_dir = tmp_path / f"resume{dp}x{sp}"
        # resume from a copy of the killed run's checkpoint (each resume writes its own later ones)
        subprocess.run(["cp", "-r", str(ckpt), str(resumed_dir)], check=True)
        for extra in resumed_dir.iterdir():
            if extra.name != "step_000004":
                subprocess.run(["rm", "-rf", str(extra)], check=True)
        summary = run_train(replace(SMALL_TRAIN, dp=dp, sp=sp, checkpoint_dir=str(resumed_dir), resume=True,
                                    out_dir=str(resumed_dir / "out")))
        got = train_losses(summary)
        assert len(got) == len(want) and got[:4] == want[:4]  # history restored from the checkpoint
        if (dp, sp) == (1, 2):
            assert got[4:] == want[4:]
        else:
            assert max(abs(g - w) / abs(w) for g, w in zip(got[4:], want[4:])) < 1e-10


def test_cli_trains_and_prints_the_accuracy_line(tmp_path):
    proc = train_cli(*small_train_args(), "--plot", out=str(tmp_path))
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text
    assert "accuracy: " in text and "loss" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 16
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "accuracy.png").exists()


def test_cli_refuses_bad_options_before_starting_ranks(tmp_path):
    for args, message in (
        (["--sp", "3", "--seq-len", "48", "--curriculum", "none"], "share a shard"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--resume", "--checkpoint-dir", str(tmp_path / "empty")], "no complete checkpoint"),
        (["--dtype", "float16"], "--dtype"),
        (["--curriculum", "abc"], "--curriculum"),
        (["--activation-checkpointing", "some"], "--activation-checkpointing"),
    ):
        proc = train_cli(*args, out=str(tmp_path))
        text, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and message in text, (args, text)


def test_text_training_is_exact_across_layouts_for_a_file_and_a_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * i}" for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "corpus_ds"))
    base = replace(SMALL_TRAIN, curriculum="64:3", log_every=0)
    for source in ("corpus.txt", "corpus_ds"):
        runs = [
            train_losses(run_train(replace(base, sp=sp, text=str(tmp_path / source), out_dir=str(tmp_path / f"{source}{sp}"))))
            for sp in (1, 2)
        ]
        assert len(runs[0]) == 3 and runs[0][0] > 4.0  # ~ln(256) at the start: next-byte prediction
        assert max(abs(a - b) / abs(a) for a, b in zip(*runs)) < 1e-10


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    """SIGKILL only the launcher: its ranks notice and exit (no orphaned processes)."""
    proc = train_cli(*small_train_args(), "--curriculum", "64:100000", "--log-every", "1", out=str(tmp_path))
    first = proc.stdout.readline()
    deadline = time.monotonic() + 120
    while "1/100000" not in first and time.monotonic() < deadline and proc.poll() is None:
        first = proc.stdout.readline()
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2, "the launcher should have started its ranks"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 20
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [c for c in children if os.path.exists(f"/proc/{c}") and "zombie" not in _state(c)]
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # clean up whatever is left before asserting
    except ProcessLookupError:
        pass
    assert not alive, f"ranks {alive} outlived their launcher"


def _state(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"
