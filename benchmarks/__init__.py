"""Benchmarks: `python -m benchmarks.bench --help`."""
