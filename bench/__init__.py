"""Benchmark programs: each prints a table and writes JSON (results in BENCHMARKS.md). Run
them from the repository root as `python -m bench.<name> --help`.

What they share:
  shapes.py     real model shapes, with random weights (our config, a model directory, transformers')
  workload.py   the seeded request mixes, and the offline run of one through an engine
  load.py       client-side load on a served stack (Generate streams from load processes),
                latency summaries, a local OTLP receiver for traced stacks
  stack_cpu.py  CPU time of each stack process from /proc, and pinning them to cores
The stack itself is started by testing/stack.py's `Stack`, as the tests start it."""
