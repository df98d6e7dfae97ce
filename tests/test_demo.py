"""The README's main command stays working: the demo on small shapes, its checks and exit code."""

from __future__ import annotations

import io

import pytest

from ulysses_dtensor.tools.cli import main
from ulysses_dtensor.tools.demo import DemoConfig, run_demo


def test_demo_reports_exact_and_minimal_uneven_shapes():
    out = io.StringIO()
    cfg = DemoConfig(world=3, heads=6, kv_heads=2, seq_len=50, head_dim=8, repeats=1)
    assert run_demo(cfg, out=out)
    text = out.getvalue()
    assert "RESULT: OK - exact and minimal" in text
    assert text.count("2 all_to_all | 2 all_to_all") == 3


def test_cli_rejects_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--dtype", "float16"])
    assert exit_info.value.code == 2
    assert "--dtype must be float64 or float32" in capsys.readouterr().err
