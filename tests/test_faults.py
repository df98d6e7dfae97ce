"""Faults in the train job: stop signals checkpoint, a killed rank fails the job fast and named,
runs are deterministic. Real processes, real signals, bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace

import pytest

from helpers import SMALL_TRAIN, small_train_args, train_cli, train_losses
from ulysses_dtensor.tools.train import run_train


def _wait_for_line(proc, text: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"never saw {text!r}; output so far:\n{seen}")


def _rank_pids(launcher_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    ranks = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"resource_tracker" not in f.read():
                    ranks.append(int(pid))
        except OSError:
            pass
    return sorted(ranks)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_after_the_step_checkpoints_and_resumes_exactly(train_reference, tmp_path, signum):
    ckpt = tmp_path / "ckpt"
    proc = train_cli(*small_train_args(log_every=1), "--checkpoint-dir", str(ckpt), out=str(tmp_path / "run"))
    _wait_for_line(proc, "1/16")
    proc.send_signal(signum)  # the launcher only; it passes the stop on to the ranks
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, text
    said = f"stopped by signal {int(signum)} after step "
    assert said in text
    stopped_at = int(text.split(said)[1].split(";")[0])
    assert 1 <= stopped_at < 16 and (ckpt / f"step_{stopped_at:06d}" / "train_state.json").exists()
    resumed = run_train(replace(SMALL_TRAIN, checkpoint_dir=str(ckpt), resume=True, out_dir=str(tmp_path / "resumed")))
    assert train_losses(resumed) == train_losses(train_reference)  # bit for bit, also the steps before the stop


def test_a_killed_rank_fails_the_job_fast_and_named(tmp_path):
    proc = train_cli(*small_train_args(log_every=1), "--curriculum", "64:100000", "--sp", "4", out=str(tmp_path))
    _wait_for_line(proc, "2/100000")
    ranks = _rank_pids(proc.pid)
    assert len(ranks) == 4, ranks
    os.kill(ranks[2], signal.SIGKILL)
    t0 = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode not in (0, None)
    assert "rank 2 failed" in text and "signal 9" in text, text[-2000:]
    assert elapsed < 20, f"the job took {elapsed:.1f} s to fail after a rank was killed"
    assert all(not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
               for pid in ranks)


def test_same_seed_same_losses_bit_for_bit(train_reference, tmp_path):
    again = run_train(replace(SMALL_TRAIN, out_dir=str(tmp_path)))
    assert train_losses(again) == train_losses(train_reference)


def test_a_rank_raising_mid_run_fails_the_job_fast_and_named(tmp_path):
    env_proc = train_cli(*small_train_args(log_every=1), "--curriculum", "64:100000", "--sp", "4", out=str(tmp_path),
                    env={"ULYSSES_DTENSOR_INJECT_FAULT": "1:5"})
    t0 = time.monotonic()
    text, _ = env_proc.communicate(timeout=120)
    assert env_proc.returncode not in (0, None)
    assert "rank 1 failed: RuntimeError: injected fault on rank 1 at step 5" in text, text[-3000:]
    assert "4/100000" in text and "5/100000" not in text  # the others never got past the step
    assert time.monotonic() - t0 < 60
