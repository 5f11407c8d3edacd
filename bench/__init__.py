"""Benchmarks: whole runs and timed models, each writing JSON (and a plot) for docs/figures."""
