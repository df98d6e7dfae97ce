"""A progress bar for rank 0 of the train job: one line per update, redrawn in place on a
terminal, printed as plain lines in logs."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


class Progress:
    """``update(step, record)`` shows step/total, loss, accuracy, tokens/s, memory and bytes.

    ``step_cost`` (relative cost of each step, e.g. growing with the curriculum's length) makes
    the ETA weigh the remaining steps by their cost instead of counting them."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None, width: int = 24,
                 step_cost: list[float] | None = None):
        self.total, self.start, self.enabled, self.width = total, start, enabled, width
        cost = step_cost or [1.0] * total
        self.cost_before = [0.0]
        for c in cost:
            self.cost_before.append(self.cost_before[-1] + c)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_comm = ""
        self.open_line = False

    def say(self, text: str) -> None:
        if self.enabled:
            self._end_line()
            print(text, file=self.stream, flush=True)

    def update(self, step: int, record: dict, force: bool = False) -> None:
        if not self.enabled or not (force or self.tty):
            return
        if "bytes_sent" in record:  # lists, one entry per rank: show the busiest rank
            self.last_comm = (
                f" | sent/rank ≤ {_mib(max(record['bytes_sent']))} (all-to-all {_mib(max(record['all_to_all_bytes']))}, "
                f"min {_mib(max(record['all_to_all_min_bytes']))}) | peak/rank ≤ {max(record['peak_mem_mib']):.0f} MiB"
            )
        done = step / self.total
        bar = "█" * int(done * self.width) + "·" * (self.width - int(done * self.width))
        elapsed = time.perf_counter() - self.t0
        spent = self.cost_before[step] - self.cost_before[self.start]
        eta = elapsed / max(spent, 1e-9) * (self.cost_before[self.total] - self.cost_before[step])
        line = (
            f"{bar} {step}/{self.total} N={record['seq_len']} | loss {record['loss']:.4f} "
            f"acc {record['accuracy']:.2f} | {record['tokens_per_s']:,.0f} tok/s{self.last_comm} "
            f"| {_duration(elapsed)} eta {_duration(eta)}"
        )
        if self.tty:
            print("\r" + line + "\033[K", end="", file=self.stream, flush=True)
            self.open_line = True
        else:
            print(line, file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self.open_line:
            print(file=self.stream, flush=True)
            self.open_line = False

    def close(self) -> None:
        if self.enabled:
            self._end_line()
