"""Soak and fault drills for ``ulysses-dtensor train`` (not part of CI; minutes, not seconds).

    python scripts/soak.py --trials 10            # all drills, 10 trials each
    python scripts/soak.py --drills resume --trials 3

Drills:
* ``resume``: train with periodic checkpoints, SIGKILL the whole job (launcher and ranks) at a
  random step, resume with ``--resume``; repeat until done. Every step's loss must equal the
  uninterrupted run's, and a kill may lose only the steps since the last checkpoint.
* ``kill-rank``: SIGKILL one random rank at a random step; every process of the job must be gone
  within ``--collective-timeout-s`` + 10 s.
* ``raise``: make one random rank raise at a random step (``ULYSSES_DTENSOR_INJECT_FAULT``);
  same bound.
After each trial: no process of the job left (so none holds a port: the launcher's rendezvous
port is its own, freed with it).
Writes a JSON report (``--out``) and prints one line per trial and a summary; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq-len", "256", "--curriculum", "128:40,256:40", "--tokens-per-step", "512", "--warmup", "5",
         "--eval-batches", "1", "--log-every", "1"]


def _start(args: list[str], out: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ulysses_dtensor", "train", *SMALL, *args, "--out-dir", out],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _wait_step(proc: subprocess.Popen, step: int, timeout_s: float = 300) -> str:
    seen, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        seen += line
        if f" {step}/" in line:
            return seen
    raise RuntimeError(f"never reached step {step}:\n{seen[-2000:]}")


def _job_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of the job's process group."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    alive = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(pid))
        except OSError:
            pass
    return alive


def _wait_gone(pgid: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _job_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _losses(path: str) -> list[float]:
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def drill_resume(trial: int, reference: list[float], sp: int, every: int, work: str) -> dict:
    rng = random.Random(trial)
    ckpt = os.path.join(work, f"resume{trial}")
    total = len(reference)
    kills, lost = [], []
    proc = _start(["--sp", str(sp), "--checkpoint-dir", ckpt, "--checkpoint-every", str(every)], out=ckpt + "_out")
    while True:
        kill_at = rng.randint(2, total - 1)
        try:
            _wait_step(proc, kill_at)
        except RuntimeError:
            break  # finished (or failed) before the kill step
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        leftover = _wait_gone(proc.pid, 10)  # SIGKILL is delivered asynchronously
        saved = max([int(d.split("_")[1]) for d in os.listdir(ckpt) if os.path.exists(os.path.join(ckpt, d, "train_state.json"))] or [0])
        kills.append(kill_at)
        lost.append(kill_at - saved)
        if leftover:
            return dict(ok=False, why=f"processes left after kill: {leftover}")
        proc = _start(["--sp", str(sp), "--checkpoint-dir", ckpt, "--checkpoint-every", str(every), "--resume"]
                      if saved else ["--sp", str(sp), "--checkpoint-dir", ckpt, "--checkpoint-every", str(every)],
                      out=ckpt + "_out")
        if len(kills) >= 2:
            break
    text, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        return dict(ok=False, why=f"final run failed (exit status {proc.returncode}):\n{text[-2000:]}")
    got = _losses(os.path.join(ckpt + "_out", "metrics.jsonl"))
    ok = got == reference and all(n <= every for n in lost)
    return dict(ok=ok, killed_at=kills, steps_lost=lost, why="" if ok else "losses differ from the uninterrupted run")


def drill_fault(trial: int, kind: str, sp: int, timeout_s: float, work: str) -> dict:
    rng = random.Random(1000 + trial)
    fault_step, fault_rank = rng.randint(4, 60), rng.randrange(sp)
    env = {"ULYSSES_DTENSOR_INJECT_FAULT": f"{fault_rank}:{fault_step}"} if kind == "raise" else None
    proc = _start(["--sp", str(sp), "--collective-timeout-s", str(timeout_s)], out=os.path.join(work, f"{kind}{trial}"), env=env)
    if kind == "raise":
        _wait_step(proc, fault_step - 1)  # the fault fires as step fault_step begins
    if kind == "kill-rank":
        _wait_step(proc, fault_step)
        ranks = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"],
                                                      capture_output=True, text=True).stdout.split())
        os.kill(ranks[fault_rank], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        text, _ = proc.communicate(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return dict(ok=False, why="hang: the job did not exit", rank=fault_rank, step=fault_step)
    leftover = _wait_gone(proc.pid, timeout_s + 10 - (time.monotonic() - t0))
    seconds = time.monotonic() - t0
    named = f"rank {fault_rank} failed" in text
    ok = proc.returncode != 0 and named and not leftover and seconds <= timeout_s + 10
    return dict(ok=ok, rank=fault_rank, step=fault_step, seconds_to_all_exited=round(seconds, 2),
                named_rank=named, leftover=leftover, why="" if ok else text[-1500:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--drills", default="resume,kill-rank,raise")
    parser.add_argument("--sp", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=7)
    parser.add_argument("--collective-timeout-s", type=float, default=30.0)
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ulysses_soak_")
    report: dict = {"args": vars(args), "trials": {}}
    failed = 0
    drills = args.drills.split(",")
    if "resume" in drills:
        print("reference: one uninterrupted run ...", flush=True)
        ref = _start(["--sp", str(args.sp)], out=os.path.join(work, "reference"))
        text, _ = ref.communicate(timeout=900)
        if ref.returncode != 0:
            print(text[-2000:])
            return 1
        reference = _losses(os.path.join(work, "reference", "metrics.jsonl"))
    for drill in drills:
        results = []
        for trial in range(args.trials):
            if drill == "resume":
                r = drill_resume(trial, reference, args.sp, args.checkpoint_every, work)
            else:
                r = drill_fault(trial, drill, args.sp, args.collective_timeout_s, work)
            results.append(r)
            failed += not r["ok"]
            shown = {k: v for k, v in r.items() if k != "why"}
            print(f"{drill} trial {trial + 1}/{args.trials}: {'ok' if r['ok'] else 'FAILED'} {shown}"
                  + ("" if r["ok"] else f"\n{r['why']}"), flush=True)
        report["trials"][drill] = results
        if drill != "resume":
            report[f"{drill}_max_seconds"] = max(r.get("seconds_to_all_exited", float("inf")) for r in results)
        print(f"== {drill}: {sum(r['ok'] for r in results)}/{len(results)} ok"
              + (f", max time to every process gone {report.get(f'{drill}_max_seconds')} s "
                 f"(bound {args.collective_timeout_s + 10:.0f} s)" if drill != "resume" else ""), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}; {'all ok' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
