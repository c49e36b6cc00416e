"""Faults against the whole delivery path: is every result made stored exactly once?

    python -m bench.faults --minutes 2                  # a quick look (about 4 minutes)
    python -m bench.faults --minutes 30 --agents 4      # the target: 0 lost, 0 stored twice, >= 50 faults

Not a timed test: a site on this machine, run for --minutes while faults strike at random
moments. N agent processes (the agent tests' hand-made ONNX model, a folder replayed in a loop)
publish to a site Mosquitto bridged to a central one (`hub bridge-config`), where `hub ingest`
stores into PostgreSQL (a fresh database; SQLite when no server answers). Both brokers persist
to disk, as deploy/mosquitto does. The faults, at random moments after a fault-free first part
(--calm, the baseline):

    site-restart, central-restart    the broker stopped (SIGTERM, or kill -9: then it also loses
                                     what it took since its last save) and started again
    hub-kill                         `hub ingest` kill -9, started again later
    agent-kill                       one agent kill -9, started again later (its spool survives)

Then the faults stop, every process is up, the agents are stopped (SIGTERM) and started once more
on one frame each with --until-drained, which ends when the hub has confirmed everything in their
spools. Made is what the agents' spools ever held (sqlite_sequence), stored what the hub's
database holds. Prints made, stored, stored twice, lost, still undelivered, and the capture-to-
storage delay of the calm part beside the rest (the baseline measured in the same run).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.fleet import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SITE = "faults"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGET_FAULTS = 50


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    """A child process that can be killed and started again with the same command."""

    name: str
    argv: list[str]
    log: Path
    port: int | None = None   # waited for after a start
    popen: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> Proc:
        with open(self.log, "a") as out:
            self.popen = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.starts += 1
        if self.port is not None:
            deadline = time.monotonic() + 20
            while not port_open(self.port):
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start; see {self.log}")
                time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if not self.running:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Site:
    work: Path
    agents: list[Proc] = field(default_factory=list)
    brokers: dict[str, Proc] = field(default_factory=dict)
    hub: Proc | None = None

    def all(self) -> list[Proc]:
        return [*self.agents, *([self.hub] if self.hub else []), *self.brokers.values()]


def mosquitto_conf(work: Path, name: str, port: int, extra: str = "") -> Path:
    data = work / f"{name}-data"
    data.mkdir(exist_ok=True)
    conf = work / f"{name}.conf"
    root = "user root\n" if os.geteuid() == 0 else ""  # else it drops to a user who cannot write here
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {data}/\nmax_queued_messages 0\n{root}{extra}")
    return conf


def agent_toml(work: Path, device: str, folder: Path, package: Path, port: int, fps: float, loop: bool,
               receipt_timeout_s: float) -> Path:
    path = work / f"{device}{'' if loop else '-drain'}.toml"
    path.write_text(
        f'device = "{device}"\nsite = "{SITE}"\nstation = "line-{device}"\npackage = "{package}"\n'
        f'broker = "mqtt://127.0.0.1:{port}"\nruntime = "onnxruntime"\nthreads = 1\nmetrics_interval_s = 10.0\n'
        f'allow_unsigned = true\n\n'   # the hand-made test package is unsigned; no key is trusted here
        f'[[sources]]\nuri = "{folder}"\ncls = "plate"\nfps = {fps}\nloop = {str(loop).lower()}\n\n'
        f'[spool]\npath = "{work / "spool" / device}.db"\n\n'
        f'[delivery]\nreceipt_timeout_s = {receipt_timeout_s}\n')
    return path


def database(admin: str, work: Path) -> tuple[str, str | None]:
    """(URL, PostgreSQL database to drop afterwards): a fresh PostgreSQL database, else SQLite."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"kdfleet_faults_{uuid.uuid4().hex[:8]}"
    try:
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except OperationalError as exc:
        print(f"PostgreSQL at {admin} is not reachable ({str(exc.orig).strip().splitlines()[0]}); "
              "the hub uses SQLite", file=sys.stderr)
        return f"sqlite:///{work / 'hub.db'}", None
    return admin.rsplit("/", 1)[0] + f"/{name}", name


def drop_database(admin: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def spool_counts(path: Path) -> tuple[int, int, int]:
    """(results ever put in the spool, still there, dropped by its bounds)."""
    with sqlite3.connect(path) as db:
        made = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        left = db.execute("SELECT count(*) FROM spool").fetchone()[0]
        dropped = db.execute("SELECT COALESCE(SUM(count), 0) FROM dropped").fetchone()[0]
    return (made[0] if made else 0), left, dropped


def stored_results(url: str) -> tuple[Counter, int, list[tuple[float, float]]]:
    """(stored per device, rows stored under an id already stored, (capture ts, delay s) of each)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT d.name, r.id, r.ts, r.received_at FROM results r JOIN devices d ON d.id = r.device_id")).all()
    engine.dispose()
    per_device = Counter(name for name, _, _, _ in rows)
    twice = len(rows) - len({rid for _, rid, _, _ in rows})
    delays = [(ts.timestamp(), (received - ts).total_seconds()) for _, _, ts, received in rows]
    return per_device, twice, delays


def strike(site: Site, kind: str, rng: random.Random) -> str:
    """Apply one fault; returns what was done, for the log."""
    if kind in ("site-restart", "central-restart"):
        broker = site.brokers[kind.split("-")[0]]
        hard = rng.random() < 0.3
        broker.stop(signal.SIGKILL if hard else signal.SIGTERM)
        down = rng.uniform(0.5, 5.0)
        time.sleep(down)
        broker.start()
        return f"{kind} ({'kill -9' if hard else 'SIGTERM'}, down {down:.1f} s)"
    if kind == "hub-kill":
        site.hub.stop(signal.SIGKILL)
        down = rng.uniform(1.0, 20.0)
        time.sleep(down)
        site.hub.start()
        return f"hub-kill (kill -9, down {down:.1f} s)"
    agent = rng.choice(site.agents)
    agent.stop(signal.SIGKILL)
    down = rng.uniform(0.5, 5.0)
    time.sleep(down)
    agent.start()
    return f"agent-kill ({agent.name}, kill -9, down {down:.1f} s)"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="how long results are made (default 2)")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--fps", type=float, default=4.0, help="frames per second per agent (default 4)")
    ap.add_argument("--calm", type=float, default=0.1, help="fault-free first part, the baseline (default 0.1)")
    ap.add_argument("--faults-per-minute", type=float, default=2.0,
                    help="after the calm part, the wait from one fault's end to the next is random with a "
                    "mean of 60 / this many seconds (default 2)")
    ap.add_argument("--receipt-timeout", type=float, default=30.0,
                    help="the agents' delivery.receipt_timeout_s (default 30, the agent's own default)")
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="seconds allowed for the final drain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pg-admin", default=os.environ.get("KDFLEET_TEST_PG", PG_ADMIN),
                    help="PostgreSQL server to make the hub's database on (default %(default)s)")
    ap.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temporary folder)")
    args = ap.parse_args(argv)
    mosquitto = next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)
    if mosquitto is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)
        (work / "spool").mkdir(exist_ok=True)
        package, plates = tiny_model(work / "model")
        one = work / "one-frame"
        one.mkdir(exist_ok=True)
        (one / "0000.png").write_bytes(next(iter(sorted(plates.iterdir()))).read_bytes())
        url, pg_name = database(args.pg_admin, work)
        py = sys.executable
        try:
            subprocess.run([py, "-m", "hub", "init-db", "--db", url], cwd=ROOT, check=True, capture_output=True)
            site = Site(work)
            central_port, site_port = free_port(), free_port()
            from hub.mosquitto import render_bridge

            bridge = render_bridge("central", f"127.0.0.1:{central_port}", site=SITE)
            for name, port, extra in (("central", central_port, ""), ("site", site_port, bridge)):
                conf = mosquitto_conf(work, name, port, extra)
                site.brokers[name] = Proc(name, [mosquitto, "-c", str(conf)], work / "logs" / f"{name}.log", port)
            site.hub = Proc("hub", [py, "-m", "hub", "ingest", "--db", url, "--broker",
                                    f"mqtt://127.0.0.1:{central_port}", "--client-id", "bench-faults-hub",
                                    "--site", SITE, "--data-dir", str(work / "hub")], work / "logs" / "hub.log")
            devices = [f"cam-{i + 1}" for i in range(args.agents)]
            for d in devices:
                cfg = agent_toml(work, d, plates, package, site_port, args.fps, True, args.receipt_timeout)
                site.agents.append(Proc(d, [py, "-m", "agent", "run", "--config", str(cfg)],
                                        work / "logs" / f"{d}.log"))
            for p in (*site.brokers.values(), site.hub):
                p.start()
            # the agents start once the hub subscribed (and the bridge stands), so the calm part is calm
            deadline = time.monotonic() + 60
            while "connected to" not in site.hub.log.read_text():
                if time.monotonic() > deadline or not site.hub.running:
                    raise RuntimeError(f"the hub did not connect; see {site.hub.log}")
                time.sleep(0.2)
            time.sleep(2.0)
            for p in site.agents:
                p.start()

            t0 = time.time()
            end = t0 + args.minutes * 60
            calm_end = t0 + args.calm * args.minutes * 60
            faults: list[tuple[float, str]] = []
            kinds = ["site-restart", "central-restart", "hub-kill", "agent-kill"]
            print(f"bench.faults: {args.agents} agents at {args.fps:g} frames/s, {args.minutes:g} min "
                  f"({args.calm:.0%} calm), hub on {'PostgreSQL' if pg_name else 'SQLite'}; logs in {work / 'logs'}",
                  flush=True)
            time.sleep(max(0.0, calm_end - time.time()))
            while True:
                wait = rng.expovariate(args.faults_per_minute / 60)
                if time.time() + wait >= end:
                    break
                time.sleep(wait)
                what = strike(site, rng.choice(kinds), rng)
                faults.append((time.time() - t0, what))
                print(f"  {time.time() - t0:7.1f} s  {what}", flush=True)
            time.sleep(max(0.0, end - time.time()))
            made_until = time.time()

            # stop making results; deliver what every spool still holds
            for p in site.agents:
                p.stop(signal.SIGTERM, timeout=60)
            drain_start = time.time()
            drains = []
            for d in devices:
                cfg = agent_toml(work, d, one, package, site_port, 0.0, False, args.receipt_timeout)
                drains.append(Proc(f"{d}-drain", [py, "-m", "agent", "run", "--config", str(cfg), "--until-drained"],
                                   work / "logs" / f"{d}.log").start())
            undrained = []
            for p in drains:
                try:
                    p.popen.wait(max(1.0, drain_start + args.drain_timeout - time.time()))
                except subprocess.TimeoutExpired:
                    undrained.append(p.name)
                    p.stop()
            drain_s = time.time() - drain_start
            time.sleep(2.0)   # the hub's last batch commits after its receipts left
            spools = {d: spool_counts(work / "spool" / f"{d}.db") for d in devices}
            per_device, twice, delays = stored_results(url)
        finally:
            for p in (*site.agents, site.hub, *site.brokers.values()):
                if p is not None:
                    p.stop()
            if pg_name:
                drop_database(args.pg_admin, pg_name)

    made = sum(m for m, _, _ in spools.values())
    left = sum(x for _, x, _ in spools.values())
    dropped = sum(x for _, _, x in spools.values())
    stored = sum(per_device.values())
    lost = sum(max(0, spools[d][0] - spools[d][1] - per_device.get(d, 0)) for d in devices)
    calm = [delay for ts, delay in delays if ts < calm_end]
    rest = [delay for ts, delay in delays if ts >= calm_end]
    kinds_done = Counter(what.split(" ")[0] for _, what in faults)
    print(f"\nfaults: {len(faults)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds_done.items()))}); "
          f"target >= {TARGET_FAULTS} over 30 min")
    print(f"made {made} results in {made_until - t0:.0f} s; drained in {drain_s:.0f} s"
          + (f"; NOT drained: {', '.join(undrained)}" if undrained else ""))
    print(f"{'':24}{'count':>10}")
    for label, value in (("made", made), ("stored", stored), ("stored twice", twice), ("lost", lost),
                         ("still undelivered", left), ("dropped by full spools", dropped)):
        print(f"  {label:22}{value:>10}")
    print(f"\ncapture to storage, s    {'calm (baseline)':>16}{'with faults':>14}{'ratio':>8}")
    for label, q in (("median", 0.5), ("p99", 0.99), ("longest", 1.0)):
        a = statistics.median(calm) if q == 0.5 and calm else percentile(calm, q)
        b = statistics.median(rest) if q == 0.5 and rest else percentile(rest, q)
        print(f"  {label:22}{a:16.3f}{b:14.3f}{b / a if a else float('nan'):8.1f}")
    ok = lost == 0 and twice == 0 and left == 0 and not undrained
    print("\n0 lost, 0 stored twice" if ok else "\nTARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
