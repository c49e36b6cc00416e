"""A whole site on this machine: how long until N stations are online and publishing, and what
the hub's ingest rate and lag are then.

    python -m bench.fleet --agents 20            # about two minutes
    python -m bench.fleet --agents 20 --fps 5 --measure 30

Runs `kdfleet fleet up` for real (private Mosquitto with provisioned device credentials, the
hub on SQLite, N agent processes replaying a folder) with the agent tests' hand-made ONNX model
(no training: tests/package_factory.py), or --package/--data/--cls. Time to all online is
counted by `fleet up` from its start (provisioning included) to the moment the hub's API shows
every device online with a result stored in the last minute. Then /metrics is scraped every
2 s for --measure seconds (60: the last scrape's window holds only steady state): ingest rate
(results stored in the last 60 s / 60) and capture-to-store lag (avg, max). Targets: all
online within 60 s, lag <= 2 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kdfleet.fleet import parse_metrics

ROOT = Path(__file__).resolve().parents[1]
TARGET_ONLINE_S = 60.0
TARGET_LAG_S = 2.0


def tiny_model(folder: Path) -> tuple[Path, Path]:
    """The agent tests' darkness package and twelve plates to replay (class "plate")."""
    import cv2
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tests.package_factory import build_package, plate

    package = build_package(folder / "pkg" / "darkness.kdpkg", metrics={})
    plates = folder / "plates"
    plates.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(plates / f"{i:04d}.png"), plate(rng, i % 3 == 0))
    return package, plates


def scrape(state: dict) -> dict[tuple[str, str], float]:
    request = urllib.request.Request(state["dashboard"] + "metrics",
                                     headers={"Authorization": f"Bearer {state['token']}"})
    samples = parse_metrics(urllib.request.urlopen(request, timeout=10).read().decode())
    return {(name, labels.get("stat") or labels.get("device") or labels.get("state", "")): value
            for name, labels, value in samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second per agent (default 2)")
    ap.add_argument("--measure", type=float, default=60.0, help="seconds of /metrics sampling once all are online")
    ap.add_argument("--package", type=Path, help="model package (default: the tiny hand-made one)")
    ap.add_argument("--data", type=Path, help="folder the agents replay (with --package)")
    ap.add_argument("--cls", default="plate", help="the class --data shows (default plate)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        package, data = (args.package, args.data) if args.package else tiny_model(work / "model")
        load_before = Path("/proc/loadavg").read_text().split()[0]
        t0 = time.monotonic()
        up = subprocess.Popen(
            [sys.executable, "-m", "kdfleet.cli", "fleet", "up", "--agents", str(args.agents), "--package",
             str(package), "--data", str(data), "--cls", args.cls, "--fps", str(args.fps), "--workdir",
             str(work / "fleet"), "--port", "18480", "--mqtt-port", "18483", "--online-timeout", "180"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state: dict = {}
        try:
            while "timing" not in state:
                if up.poll() is not None:
                    print(f"fleet up exited with {up.returncode}; see {work / 'fleet' / 'logs'}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
                path = work / "fleet" / "fleet.json"
                if path.exists():
                    state = json.loads(path.read_text())
            wall_online = time.monotonic() - t0
            timing = state["timing"]
            rates, lag_avg, lag_max, publishing = [], [], [], []
            end = time.monotonic() + args.measure
            while time.monotonic() < end:
                m = scrape(state)
                rates.append(m[("kdfleet_ingest_rate", "")])
                lag_avg.append(m.get(("kdfleet_ingest_lag_seconds", "avg"), float("nan")))
                lag_max.append(m.get(("kdfleet_ingest_lag_seconds", "max"), float("nan")))
                publishing.append(sum(1 for d in state["devices"]
                                      if m.get(("kdfleet_device_results_last_minute", d), 0) > 0))
                time.sleep(2.0)
            load_during = Path("/proc/loadavg").read_text().split()[0]
        finally:
            subprocess.run([sys.executable, "-m", "kdfleet.cli", "fleet", "down", "--workdir", str(work / "fleet")],
                           cwd=ROOT, capture_output=True, timeout=120)
            up.wait(60)

    offered = args.agents * args.fps
    print(f"fleet: {args.agents} agents at {args.fps:g} frames/s each ({offered:g} results/s offered), "
          f"hub on SQLite, private Mosquitto; load average {load_before} before, {load_during} during")
    print(f"  provisioning (init-db, admin, token, {args.agents} devices): {timing['provisioning_s']:.1f} s")
    print(f"  agents started after:                 {timing['agents_started_s']:.1f} s")
    online = timing["all_online_s"]
    print(f"  all {args.agents} online and publishing after: "
          f"{'NOT within 180 s' if online is None else f'{online:.1f} s'} (bench wall clock {wall_online:.1f} s; "
          f"target {TARGET_ONLINE_S:.0f} s)")
    print(f"  over {args.measure:.0f} s after that ({len(rates)} scrapes of /metrics):")
    print(f"    devices publishing (results in the last minute): min {min(publishing)} of {args.agents}")
    print(f"    ingest rate, results/s (60 s window): median {statistics.median(rates):.1f}, last {rates[-1]:.1f}")
    print(f"    ingest lag, capture to stored: avg {statistics.median(lag_avg):.3f} s (median of scrapes), "
          f"max {max(lag_max):.3f} s (target <= {TARGET_LAG_S:.0f} s)")
    ok = online is not None and online <= TARGET_ONLINE_S and max(lag_max) <= TARGET_LAG_S
    print("  targets met" if ok else "  targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
