"""Benchmarks that print tables and ratios against a baseline measured in the same run.

    python -m bench.hub            # ingest throughput and dashboard page latency
    python -m bench.quantization   # FP32 / FP16 / INT8 variants of every method
    python -m bench.agent          # the station pipeline end to end (also `kdfleet agent bench`)
"""
