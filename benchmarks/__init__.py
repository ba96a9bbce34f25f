"""Benchmarks of the served path against its ceilings: `python -m benchmarks --help`."""
