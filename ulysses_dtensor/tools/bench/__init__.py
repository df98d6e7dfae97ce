"""Benchmarks of Ulysses attention against its peers (``ulysses-dtensor bench``).

Dependencies run one way: this package imports the library; nothing in the library imports it
(the CLI loads it on demand). DeepSpeed is an optional peer: without it its rows are skipped.

* :mod:`.baselines`: the implementations compared, behind one signature, and their byte needs.
* :mod:`.measure`: one attention case on one rank: checked, counted, memory, interleaved timing.
* :mod:`.model_step`: the same for a training step of ``llama.Llama``.
* :mod:`.suite`: which cases run, the memory-scaling search, summaries over ranks.
* :mod:`.report`: JSON, markdown and plots.
"""

from .suite import BenchConfig, run_suite

__all__ = ["BenchConfig", "run_suite"]
