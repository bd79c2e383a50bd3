"""Benchmark harnesses (load generator, service benchmarks) and naive baselines."""
