"""The benchmark suite: ``python benchmarks/bench.py [--quick] [--out DIR] ...``.

The same as ``ulysses-dtensor bench``; the suite lives in ``ulysses_dtensor/tools/bench/`` so the
installed package can run it. See docs/performance.md ("Benchmarks") for what it measures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulysses_dtensor.tools.cli import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(["bench", *sys.argv[1:]]))
