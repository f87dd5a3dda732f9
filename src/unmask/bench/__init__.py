"""The benchmark harness behind `unmask bench`."""

from unmask.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
