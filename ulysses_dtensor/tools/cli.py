"""Command line: ``ulysses-dtensor train``, ``demo``, ``plan`` and ``bench`` (also ``python -m ulysses_dtensor``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .bench.suite import BenchConfig
from .demo import DemoConfig, run_demo
from .planner import PlanConfig, run_plan
from .train import TrainConfig, run_train


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata.get("help"))
        else:
            kind = {"int": int, "str": str, "float": float}.get(str(f.type), type(f.default))
            text = f.metadata.get("help", "").replace("%", "%%")
            parser.add_argument(flag, type=kind, default=f.default, help=f"{text} (default: {f.default})".strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ulysses-dtensor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="Ulysses attention on local gloo ranks, checked against one process (error, bytes)"
    )
    _add_dataclass_args(demo, DemoConfig)
    train = sub.add_parser(
        "train", help="train a Llama-style model with Ulysses SP on local ranks (or under torchrun)",
        description="Train on the embedded long-context retrieval task (default) or a local text.",
    )
    _add_dataclass_args(train, TrainConfig)
    plan = sub.add_parser(
        "plan", help="memory and communication per GPU of a Ulysses × FSDP2 step; the best (dp, sp) layout",
        description="Analytic planner: memory per GPU (FSDP2 state, activations, attention workspace, loss), "
        "communication per step, the best (dp, sp) layout and the longest sequence that fits. "
        "Example: ulysses-dtensor plan --model llama3-8b --seq-len 1M --gpus 32 --gpu-mem-gib 80",
    )
    _add_dataclass_args(plan, PlanConfig)
    bench = sub.add_parser(
        "bench", help="benchmark attention and a training step against all-gather, DTensor and DeepSpeed",
        description="Time, bytes per rank (counted) against each scheme's minimum, and peak memory of Ulysses "
        "attention vs its peers on local gloo ranks; writes JSON, markdown and PNGs. --quick: a smoke run.",
    )
    _add_dataclass_args(bench, BenchConfig)
    args = parser.parse_args(argv)
    if args.command == "train":
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        return _train(cfg)
    if args.command == "demo":
        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        if cfg.dtype not in ("float64", "float32"):
            parser.error("--dtype must be float64 or float32")
        return 0 if run_demo(cfg) else 1
    if args.command == "bench":
        from .bench.suite import main_entry

        return main_entry(BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)}))
    if args.command == "plan":
        return run_plan(PlanConfig(**{f.name: getattr(args, f.name) for f in fields(PlanConfig)}))
    return 2


def _train(cfg: TrainConfig) -> int:
    import time

    t0 = time.perf_counter()
    try:
        summary = run_train(cfg)
    except ValueError as exc:
        print(f"ulysses-dtensor train: error: {exc}", file=sys.stderr)
        return 2
    if "history" not in summary or "outputs" not in summary:
        return 0  # a non-zero rank under torchrun: rank 0 reports
    last = summary["history"][-1] if summary["history"] else {}
    print(f"\ndone: {summary['steps']}/{summary['total_steps']} steps in {time.perf_counter() - t0:.0f} s"
          + (f", final training loss {last['loss']:.4f}" if last else ""))
    if summary.get("interrupted"):
        where = f"; checkpoint in {cfg.checkpoint_dir} (continue with --resume)" if cfg.checkpoint_dir else ""
        print(f"stopped by signal {summary['interrupted']} after step {summary['steps']}{where}")
        return 128 + summary["interrupted"]
    if "eval_accuracy" in summary:
        print(f"held-out evaluation at seq_len={cfg.seq_len} (chance {summary['chance']:.2f}):")
        print(f"accuracy: {summary['eval_accuracy']:.2f}")
    for path in summary["outputs"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
