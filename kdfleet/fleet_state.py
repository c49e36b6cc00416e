"""A running fleet as `kdfleet fleet status` and `down` find it: the processes `up` started, the state
file it keeps (WORKDIR/fleet.json), and the site as the hub sees it (its API and /metrics), which
`up` also waits on until every station is online.

A process is recorded with its start time since boot, so a pid the system has
given to another process since is not taken for it.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdfleet.demo import Fleet

STATE_FILE = "fleet.json"


@dataclass(frozen=True)
class ProcessRecord:
    """A started process as the state file keeps it; `start_ticks` tells a reused pid apart."""

    name: str
    pid: int
    start_ticks: int
    log: str


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else int(fields[19])


def alive(record: ProcessRecord) -> bool:
    """True when the recorded process still runs (the same process, not a reused pid)."""
    return start_ticks(record.pid) == record.start_ticks


# -- state --------------------------------------------------------------------------


def read_state(workdir: Path) -> dict[str, Any] | None:
    path = workdir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {path}: {exc}; delete it if no fleet runs from {workdir}") from None


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    """Replace the state file in one step (mode 0600: it holds the API token)."""
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(workdir / STATE_FILE)


# -- the hub's view -----------------------------------------------------------------


def http_get(url: str, token: str, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = {k: re.sub(r"\\(.)", r"\1", v) for k, v in LABEL.findall(m.group(2) or "")}
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def hub_view(state: dict[str, Any]) -> dict[str, Any]:
    """The site as the hub sees it: devices (from /api/devices), per-device results in the last
    minute, ingest rate and lag (from /metrics). Raises OSError when the hub does not answer."""
    base, token, site = state["dashboard"], state["token"], state["site"]
    found = json.loads(http_get(f"{base}api/devices?site={site}", token))["devices"]
    samples = parse_metrics(http_get(f"{base}metrics", token).decode())
    per_device = {s[1]["device"]: s[2] for s in samples
                  if s[0] == "kdfleet_device_results_last_minute" and s[1].get("site") == site}
    overall = {(s[0], s[1].get("stat", "")): s[2] for s in samples if not s[1].get("device")}
    devices = [{"device": d["name"], "state": d["state"], "last_seen": d["last_seen"], "fps": d["fps"],
                "spool_depth": d["spool_depth"], "results_last_minute": int(per_device.get(d["name"], 0))}
               for d in found]
    return {"devices": devices, "ingest_rate": overall.get(("kdfleet_ingest_rate", "")),
            "lag_avg_s": overall.get(("kdfleet_ingest_lag_seconds", "avg")),
            "lag_max_s": overall.get(("kdfleet_ingest_lag_seconds", "max"))}


def wait_online(state: dict[str, Any], fleet: Fleet, n: int, timeout: float) -> float | None:
    """Poll the hub until all `n` devices are online with a result stored; the monotonic time
    then, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check()
        try:
            view = hub_view(state)
        except (OSError, ValueError):
            view = {"devices": []}
        ready = [d for d in view["devices"] if d["state"] == "online" and d["last_seen"]
                 and d["results_last_minute"] > 0]
        if len(ready) >= n:
            return time.monotonic()
        time.sleep(0.5)
    return None
