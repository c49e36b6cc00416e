"""The parts of `kdfleet trainer serve` (trainer/serve.py), one job each.

    hub.py       the hub's HTTP API as the service uses it (`Hub`) and `ServeError`
    config.py    what the command was told (`ServeConfig`)
    workdir.py   WORKDIR/state.json and the reviewed images collected into WORKDIR/inbox
    lineage.py   which model the fleet runs, its checkpoint and package, the next version
    candidate.py fine-tune, quantise, score and package a candidate
    cycle.py     one cycle: collect, fine-tune, gate, publish, roll out; WORKDIR/cycles.jsonl

Torch and the trainer's heavy modules load inside the functions that use them.
"""
