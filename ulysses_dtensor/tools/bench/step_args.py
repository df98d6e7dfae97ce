"""Command-line options shared by the GPT step benchmarks (``benchmarks/*_overhead.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_step_args(doc: str, modes: tuple[str, ...], seq_len: int, out: Path) -> dict:
    """Parse the options of a benchmark timing a GPT step (``ulysses_dtensor/tools/llama.py``) in
    several ``modes`` on ``--sp`` local ranks; ``--modes`` is checked against ``modes``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed (and profiled) steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the modes (medians are reported)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(modes), help=f"comma-separated, of {modes}")
    parser.add_argument("--out", type=Path, default=out)
    args = vars(parser.parse_args())
    args["modes"] = [m for m in args["modes"].split(",") if m]
    unknown = set(args["modes"]) - set(modes)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; expected some of {modes}")
    return args
