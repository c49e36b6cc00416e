"""`python -m bench` (`make bench`): list the benchmarks, run one, or run each at its smallest setting.

    python -m bench                        # the list, with each benchmark's command
    python -m bench agent --size 256 --precision int8
                                           # one benchmark, its own options (= python -m bench.agent ...)
    python -m bench --smoke [NAME ...]     # every (or the named) benchmark at its smallest setting, in a
                                           # temporary folder: proves it runs, measures nothing worth keeping

A full run of every benchmark takes hours (the accuracy benchmark alone about one on 2 cores), so
`make bench` lists them rather than starting them all; `make bench BENCH="agent --size 256"` runs one.
"""
from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

# name -> the smallest setting that still runs every stage; "{work}" becomes a temporary folder
SMOKE: dict[str, list[str]] = {
    "agent": ["--size", "64", "--epochs", "1", "--precision", "int8", "--frames", "20", "--threads", "1",
              "--work", "{work}"],
    "quantization": ["--work", "{work}", "--methods", "stfpm", "--size", "64", "--epochs", "1",
                     "--recipes", "fp32,ptq:train", "--calib-images", "4", "--latency-runs", "2",
                     "--latency-rounds", "1", "--threads", "1"],
    "accuracy": ["--preset", "synthetic", "--work", "{work}", "--size", "64", "--epochs", "1",
                 "--classes", "washer", "--methods", "stfpm", "--modes", "unified", "--no-int8", "--threads", "1"],
    "hub": ["--publishers", "2", "--rate", "200", "--seconds", "2", "--results", "400", "--workers", "1",
            "--pool", "2", "--rows", "5000", "--repeat", "1"],
    "fleet": ["--agents", "2", "--fps", "2", "--measure", "4"],
    "ota": ["--agents", "2", "--fps", "2", "--wave-timeout", "5", "--skip-retrain", "--cache", "{work}"],
    "faults": ["--minutes", "0.3", "--agents", "1", "--fps", "2", "--faults-per-minute", "30",
               "--drain-timeout", "120"],
}
NAMES = tuple(SMOKE)


def summary(name: str) -> str:
    doc = importlib.import_module(f"bench.{name}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def smoke_argv(name: str, work: Path) -> list[str]:
    """`name`'s smallest setting with its work folder under `work`."""
    return [a.replace("{work}", str(work / name)) for a in SMOKE[name]]


def run(name: str, argv: list[str]) -> int:
    main = importlib.import_module(f"bench.{name}").main
    return main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("benchmarks (python -m bench NAME [options]; NAME --help for its options):")
        for name in NAMES:
            print(f"  {name:13s} {summary(name)}")
        print("python -m bench --smoke [NAME ...] runs each at its smallest setting (a check that it runs)")
        return 0
    if argv[0] == "--smoke":
        names = argv[1:] or list(NAMES)
        unknown = [n for n in names if n not in SMOKE]
        if unknown:
            print(f"python -m bench: no benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}",
                  file=sys.stderr)
            return 2
        worst = 0
        with tempfile.TemporaryDirectory(prefix="kdfleet-bench-smoke-") as tmp:
            for name in names:
                print(f"== {name} (smallest setting)", flush=True)
                worst = max(worst, run(name, smoke_argv(name, Path(tmp))))
        return worst
    if argv[0] not in SMOKE:
        print(f"python -m bench: no benchmark {argv[0]!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
