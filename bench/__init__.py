"""Benchmarks that print tables and ratios: `python -m bench.hub`, ..."""
