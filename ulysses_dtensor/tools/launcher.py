"""Launch a job's ranks as local processes, or join the ranks ``torchrun`` started.

:func:`run_ranks` starts ``world`` processes (NCCL with one GPU each when CUDA is available, else
gloo on CPU), runs ``fn(*args)`` on each inside an initialized process group and returns rank 0's
result. When any rank fails, the launcher names it and prints its traceback, stops the others
and raises :class:`RankFailure`: one failing rank never leaves the rest hanging.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from .rank_group import RankFailure


def under_torchrun() -> bool:
    """True when the environment describes a rank started by torchrun (or another launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(timeout_s: float) -> None:
    """Join the process group described by torchrun's environment variables."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Exit this rank when the launcher dies (killed, crashed): ranks never outlive their job."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def _rank_main(rank: int, world: int, port: int, timeout_s: float, fn, args, results) -> None:
    _exit_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init_from_env(timeout_s)
        out = fn(*args)
        results.put((rank, "ok", out if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _forward_stop_signals(procs) -> Callable[[], None]:
    """While the ranks run, SIGTERM / SIGINT to the launcher is passed on to every rank (the job
    stops after its current step and checkpoints); a second one kills the ranks.
    Returns the function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for p in procs:
            if p.is_alive():
                if len(received) > 1:
                    p.kill()
                else:
                    os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 300.0,
              grace_s: float = 10.0) -> Any:
    """Run ``fn(*args)`` on ``world`` local ranks; return rank 0's result.

    ``timeout_s`` bounds every collective; after the first failure the other ranks get
    ``grace_s`` seconds to report before they are killed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, timeout_s, fn, args, results), name=f"rank{r}")
        for r in range(world)
    ]
    for p in procs:
        p.start()
    restore = _forward_stop_signals(procs)
    replies: dict[int, tuple[str, Any]] = {}
    first_failure = first_rank = None
    try:
        while len(replies) < world:
            try:
                rank, status, payload = results.get(timeout=0.5)
                replies[rank] = (status, payload)
                if status == "error" and first_failure is None:
                    first_failure, first_rank = time.monotonic(), rank
            except Exception:  # queue.Empty
                pass
            for r, p in enumerate(procs):
                if r not in replies and not p.is_alive() and p.exitcode not in (None, 0):
                    # died without reporting (killed, segfault): give its message a moment to arrive
                    time.sleep(0.2)
                    if r not in replies and results.empty():
                        replies[r] = ("error", f"process exited with code {p.exitcode} (signal {-p.exitcode})"
                                      if p.exitcode < 0 else f"process exited with code {p.exitcode}")
                        if first_failure is None:
                            first_failure, first_rank = time.monotonic(), r
            if first_failure is not None and time.monotonic() - first_failure > grace_s:
                break
    finally:
        restore()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errors = {r: payload for r, (status, payload) in replies.items() if status == "error"}
    if errors or len(replies) < world:
        # the rank that failed first is the cause; the others usually fail because of it
        lines = [f"rank {r} failed: {text}" for r, text in sorted(errors.items(), key=lambda e: (e[0] != first_rank, e[0]))]
        missing = sorted(set(range(world)) - set(replies))
        if missing:
            lines.append(f"ranks {missing} were stopped after the failure")
        raise RankFailure(f"{len(errors)} of {world} ranks failed (first: rank {first_rank})\n" + "\n".join(lines),
                          {r: ("error", t) for r, t in errors.items()})
    return replies[0][1]
