"""Benchmarks that print tables and ratios against a baseline measured in the same run.

    python -m bench.hub            # ingest throughput and dashboard page latency
    python -m bench.quantization   # FP32 / FP16 / INT8 variants of every method
    python -m bench.agent          # the station pipeline end to end (also `kdfleet agent bench`)
    python -m bench.accuracy       # STFPM / RD / US unified vs one-class per class, beside the kNN yardstick
    python -m bench.fleet          # `fleet up --agents 20`: time to all online, ingest rate and lag
    python -m bench.ota            # a rollout to 20 agents: time to done, inference stall at the swap
    python -m bench.faults         # broker restarts, kill -9 of hub and agents, a bridge: made vs stored

`python -m bench` lists them; `python -m bench --smoke` runs each at its smallest setting (bench/__main__.py).
"""
