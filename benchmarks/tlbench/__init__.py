"""The benchmark behind benchmarks/bench.py, one module per concern: cases, targets, timing,
peers, machine, runner, report."""
