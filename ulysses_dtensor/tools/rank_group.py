"""Run functions on P local ranks (spawned processes, real gloo process group), bounded in time.

A :class:`RankGroup` starts its processes once and then runs any number of functions on them,
so tests pay the torch import and process-group setup once per module, not once per example.
Every call has a deadline: a rank that hangs or dies fails the call with an error naming it,
and the group is restarted, so a bug fails a test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_CALL_TIMEOUT_S = 120.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0


@dataclass
class RankContext:
    """What a function run by :class:`RankGroup` receives on each rank.

    Attributes:
        rank: this rank in ``group`` (0 .. world-1).
        world: the size of ``group``: the world size the caller asked for.
        group: a process group of ranks 0 .. world-1 (subgroup of the spawned ranks).
    """

    rank: int
    world: int
    group: dist.ProcessGroup
    groups: dict = field(default_factory=dict, repr=False)  # p -> group of ranks 0..p-1, for every p
    _meshes: dict = field(default_factory=dict, repr=False)

    def mesh(self, dim_name: str = "sp"):
        """A 1-D CPU DeviceMesh over ``group`` (built from the group: no new collective setup)."""
        from torch.distributed.device_mesh import DeviceMesh

        if dim_name not in self._meshes:
            self._meshes[dim_name] = DeviceMesh.from_group(self.group, "cpu", mesh_dim_names=(dim_name,))
        return self._meshes[dim_name]


class RankFailure(RuntimeError):
    """A function failed on one or more ranks; the message holds every failing rank's traceback."""

    def __init__(self, message: str, errors: dict[int, tuple[str, str]]):
        super().__init__(message)
        self.errors = errors  # rank -> (exception type name, traceback text)


def _worker(rank: int, world: int, init_file: str, collective_timeout_s: float, conn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    # Subgroups of ranks 0..p-1 for every p, created once (new_group is collective over all ranks).
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    groups = {p: dist.new_group(list(range(p)), timeout=timeout) for p in range(1, world + 1)}
    contexts = {p: RankContext(rank, p, groups[p], groups) for p in range(1, world + 1) if rank < p}
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, world_for_call, args, kwargs = message
        if rank >= world_for_call:
            conn.send(("ok", None))
            continue
        try:
            conn.send(("ok", fn(contexts[world_for_call], *args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", (type(exc).__name__, traceback.format_exc())))
    dist.destroy_process_group()


class RankGroup:
    """``world`` spawned processes joined in one gloo process group.

    Example::

        with RankGroup(4) as ranks:
            outs = ranks.run(my_fn, x, world=2)   # my_fn(ctx, x) on ranks 0 and 1

    ``my_fn`` must be importable (module level) and its arguments and results picklable.
    """

    def __init__(
        self,
        world: int,
        *,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        grace_after_error_s: float = 10.0,
    ):
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        self.world = world
        self.call_timeout_s = call_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.grace_after_error_s = grace_after_error_s
        self._procs: list = []
        self._conns: list = []
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="ulysses_ranks_")
        init_file = os.path.join(self._tmpdir.name, "init")
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, self.world, init_file, self.collective_timeout_s, child),
                daemon=True, name=f"ulysses-rank{rank}",
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._collect(range(self.world), self.call_timeout_s, what="start-up")

    def _collect(self, ranks, timeout_s: float, what: str) -> dict[int, tuple[str, Any]]:
        replies: dict[int, tuple[str, Any]] = {}
        deadline = _now() + timeout_s
        pending = set(ranks)
        while pending:
            waitables = [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending]
            mp_connection.wait(waitables, timeout=max(deadline - _now(), 0.0))
            for rank in sorted(pending):
                conn, proc = self._conns[rank], self._procs[rank]
                if conn.poll():
                    try:
                        replies[rank] = conn.recv()
                    except EOFError:
                        replies[rank] = ("died", f"rank {rank} exited with code {proc.exitcode}")
                elif not proc.is_alive():
                    replies[rank] = ("died", f"rank {rank} exited with code {proc.exitcode}")
                else:
                    continue
                pending.discard(rank)
                if replies[rank][0] != "ok":
                    # A failed rank can leave the others blocked in a collective: give them a
                    # short grace period, not the whole call timeout.
                    deadline = min(deadline, _now() + self.grace_after_error_s)
            if pending and _now() >= deadline:
                for rank in pending:
                    replies[rank] = (
                        "timeout",
                        f"rank {rank} gave no answer to {what} in time ({timeout_s:.0f} s, or "
                        f"{self.grace_after_error_s:.0f} s after another rank failed)",
                    )
                break
        if any(v[0] in ("died", "timeout") for v in replies.values()):
            self.close(force=True)
            failed = {r: v for r, v in sorted(replies.items()) if v[0] != "ok"}
            # Ranks that raised come first: their tracebacks are the cause, the rest the effect.
            errors = {r: v[1] for r, v in failed.items() if v[0] == "error"}
            errors.update({r: (v[0], v[1]) for r, v in failed.items() if v[0] != "error"})
            lines = [f"rank {r} raised {e[0]}:\n{e[1]}" if failed[r][0] == "error" else e[1] for r, e in errors.items()]
            raise RankFailure(f"{what} failed:\n" + "\n".join(lines), errors)
        return replies

    def run(self, fn: Callable[..., Any], *args: Any, world: int | None = None, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on ranks 0..world-1; return their results by rank.

        Raises :class:`RankFailure` if any rank raised, died or exceeded the deadline. After an
        error other than a ValueError/TypeError raised on every rank (input validation, which
        leaves the group consistent), the processes are restarted for the next call.
        """
        world = self.world if world is None else world
        if not 1 <= world <= self.world:
            raise ValueError(f"world={world} outside 1..{self.world}")
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn, world, args, kwargs))
        replies = self._collect(range(self.world), timeout_s or self.call_timeout_s, what=fn.__name__)
        errors = {r: v[1] for r, v in replies.items() if v[0] == "error"}
        if errors:
            validation = len(errors) == world and all(e[0] in ("ValueError", "TypeError") for e in errors.values())
            if not validation:
                self.close(force=True)
            first = min(errors)
            raise RankFailure(
                f"{fn.__name__} raised {errors[first][0]} on ranks {sorted(errors)}; rank {first}:\n{errors[first][1]}",
                errors,
            )
        return [replies[r][1] for r in range(world)]

    def close(self, force: bool = False) -> None:
        """Stop every rank (politely unless ``force``) and remove the rendezvous files."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _now() -> float:
    return time.monotonic()
