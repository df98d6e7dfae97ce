"""Command line: ``ulysses-dtensor demo`` (and ``python -m ulysses_dtensor demo``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .demo import DemoConfig, run_demo


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "str": str, "float": float}.get(str(f.type), type(f.default))
            parser.add_argument(flag, type=kind, default=f.default, help=f"default: {f.default}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ulysses-dtensor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="Ulysses attention on local gloo ranks, checked against one process (error, bytes)"
    )
    _add_dataclass_args(demo, DemoConfig)
    args = parser.parse_args(argv)
    if args.command == "demo":
        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        if cfg.dtype not in ("float64", "float32"):
            parser.error("--dtype must be float64 or float32")
        return 0 if run_demo(cfg) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
