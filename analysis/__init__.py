"""Analysis of runs and of the system: benchmarks, communication cost, per-location models."""
