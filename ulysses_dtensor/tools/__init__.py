"""Applications built on the library: the CLI, the training job, the planner, benchmarks,
the demo, the job launcher and the test harness. The library never imports from here."""
