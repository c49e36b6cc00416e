"""The fleet across hosts: one agent's network link cut for a minute, then restored.

Linux network namespaces stand in for machines: a "site" namespace holds a bridge
(10.77.0.1/24), the private Mosquitto and the hub (`hub serve`, SQLite); each of three
agents (`agent run`, replaying a folder in a loop) has a namespace of its own, joined to
the bridge by a veth pair. Every address lives inside namespaces this test creates, and
teardown deletes them, whatever happened. Cutting is `ip link set DOWN` on the bridge
side of one agent's veth: a pulled cable as the agent sees it (no reset, nothing).

It proves: the broker fires the agent's last will once the keepalive runs out and the
hub's database shows the device offline while the others stay online; after the link
comes back the agent reconnects by itself and is online again; and every result the
agent made (by its own spool's count) is in the hub exactly once, those made during the
cut delivered after it. To count, the agent is stopped with SIGTERM, which delivers what
it made before it goes offline.

    .venv/bin/python -m pytest -m slow tests/fleet/test_netns.py -s      # the full minute
    KDFLEET_NETNS_CUT_S=25 .venv/bin/python -m pytest -m slow tests/fleet/test_netns.py -s
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub.mosquitto import render_listener
from shared import topics
from shared.config import BrokerConfig
from tests.package_factory import build_package
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = "/usr/sbin/mosquitto"

CUT_S = 60.0  # the issue: "cut one agent's link for a minute"
CUT_ENV = "KDFLEET_NETNS_CUT_S"  # a shorter cut to iterate with; the agents then use a shorter keepalive
AGENTS = 3
FPS = 3.0  # frames per second per agent: a few, so a minute's cut leaves a backlog of ~180
VICTIM = "station-2"  # the agent whose link is cut
SITE = "plant"
SUBNET = "10.77.0"  # inside the test's own namespaces only
SITE_IP = f"{SUBNET}.1"
MQTT_PORT = 1883
HUB_MQTT_PORT = 1884  # the hub's own listener (hub/mosquitto.py)
HUB_CLIENT = "kdfleet-netns-hub"
WEB_PORT = 8080
DEFAULT_KEEPALIVE_S = BrokerConfig().keepalive  # the agents' keepalive_s unless the cut is short
MIN_KEEPALIVE_S = 5  # the smallest keepalive_s an agent accepts
OBSERVE_MARGIN_S = 10.0  # time left in the cut, after the will is due, to see it in the database
ONLINE_TIMEOUT_S = 120.0  # start-up: three Pythons loading ONNX Runtime on 2 shared CPUs
RECONNECT_TIMEOUT_S = 120.0  # after the restore: paho's reconnect backoff reaches 20-30 s


def cut_seconds() -> float:
    return float(os.environ.get(CUT_ENV, CUT_S))


def agent_keepalive(cut_s: float) -> int:
    """The agents' `keepalive_s` for a cut of `cut_s`.

    Mosquitto declares a client gone 1.5 keepalives after its last packet. The default 30 s
    fits a one-minute cut; a shorter cut needs a shorter keepalive.
    """
    if cut_s >= 1.5 * DEFAULT_KEEPALIVE_S + OBSERVE_MARGIN_S:
        return DEFAULT_KEEPALIVE_S
    keepalive = int((cut_s - OBSERVE_MARGIN_S) / 1.5)
    if keepalive < MIN_KEEPALIVE_S:
        shortest = 1.5 * MIN_KEEPALIVE_S + OBSERVE_MARGIN_S
        raise ValueError(f"{CUT_ENV}={cut_s:g}: too short to see a last will; give at least {shortest:g} s")
    return keepalive


def run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out


# -- the network ------------------------------------------------------------------------


@dataclass
class Network:
    """The namespaces of one run: `site` (bridge, broker, hub) and one per agent."""

    site: str
    agents: dict[str, str] = field(default_factory=dict)  # device -> namespace
    ports: dict[str, str] = field(default_factory=dict)  # device -> its veth end on the bridge
    created: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def delete(self) -> list[str]:
        """Delete every namespace this run made; the ones that would not go."""
        failed = []
        for name in reversed(self.created):
            if run("ip", "netns", "delete", name, check=False).returncode != 0:
                failed.append(name)
        return failed

    def set_link(self, device: str, up: bool) -> None:
        run("ip", "-n", self.site, "link", "set", self.ports[device], "up" if up else "down")


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root: it creates network namespaces and veth pairs"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if not Path(MOSQUITTO).exists():
        return f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto)"
    probe = f"kdprobe-{uuid.uuid4().hex[:8]}"
    out = run("ip", "netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"`ip netns add` is not available here: {out.stderr.strip()}"
    run("ip", "netns", "delete", probe, check=False)
    return None


@pytest.fixture
def network() -> Iterator[Network]:
    """A bridge in a site namespace and one namespace per agent, wired to it; deleted afterwards."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]  # unique per run: parallel runs and leftovers never collide
    net = Network(site=f"kd{tag}-site")
    try:
        net.add(net.site)
        run("ip", "-n", net.site, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", net.site, "addr", "add", f"{SITE_IP}/24", "dev", "br0")
        run("ip", "-n", net.site, "link", "set", "br0", "up")
        for i in range(1, AGENTS + 1):
            device, ns, port = f"station-{i}", f"kd{tag}-a{i}", f"port{i}"
            net.add(ns)
            # both ends are made inside their namespaces: nothing touches the host's own network
            run("ip", "-n", net.site, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", net.site, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            net.agents[device], net.ports[device] = ns, port
        yield net
    finally:
        left = net.delete()
        assert not left, f"namespaces left behind: {left}"


# -- processes ----------------------------------------------------------------------------


@dataclass
class Procs:
    """Processes started in namespaces; stopped in reverse order (agents, hub, broker)."""

    logs: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    running: set[str] = field(default_factory=set)  # the ones that must not exit on their own

    def start(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None,
              daemon: bool = True) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            # `ip netns exec` execs the command: the pid is the process itself
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)
        self.started.append((name, proc))
        if daemon:
            self.running.add(name)
        return proc

    def check(self) -> None:
        for name, proc in self.started:
            if name in self.running and proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, name: str, timeout: float = 30.0) -> int:
        proc = dict(self.started)[name]
        self.running.discard(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for name, _ in reversed(self.started):
            self.stop(name, timeout=15.0)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    (tmp_path / "logs").mkdir()
    p = Procs(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()  # before the namespaces go (fixtures tear down in reverse: procs after network)


# -- what the hub and the agent recorded --------------------------------------------------


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def online(hub_db: Path) -> dict[str, bool]:
    return {name: bool(on) for name, on in query(hub_db, "SELECT name, online FROM devices")}


def results_of(hub_db: Path, device: str) -> list[tuple[str, datetime, datetime]]:
    """(id, capture time, hub arrival time) of every stored result of `device`."""
    rows = query(hub_db, "SELECT r.id, r.ts, r.received_at FROM results r JOIN devices d ON d.id = r.device_id "
                         "WHERE d.name = ?", device)
    return [(i, utc(ts), utc(received)) for i, ts, received in rows]


def utc(stored: str) -> datetime:
    return datetime.fromisoformat(stored).replace(tzinfo=UTC)  # SQLite keeps naive UTC (hub/db/models.py)


def spool_depth(spool: Path) -> int:
    return query(spool, "SELECT COUNT(*) FROM spool")[0][0]


# -- the test ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cut_link_goes_offline_comes_back_and_loses_nothing(
    tmp_path: Path, network: Network, procs: Procs, plate_folder: Path
) -> None:
    cut_s = cut_seconds()
    keepalive = agent_keepalive(cut_s)
    py = sys.executable
    package = build_package(tmp_path / "package" / "darkness.kdpkg")

    # the hub's database and every device's broker account, as `kdfleet fleet up` provisions them
    hub_db = tmp_path / "hub.db"
    auth = tmp_path / "mosquitto"
    passwd, acl = auth / "passwd", auth / "acl"
    config = tmp_path / "hub.toml"
    config.write_text(f'data_dir = "{tmp_path / "hub"}"\n\n'
                      f'[mqtt_auth]\npassword_file = "{passwd}"\nacl_file = "{acl}"\n')
    hub_password = uuid.uuid4().hex
    hub_broker = f"mqtt://kdfleet-hub:{hub_password}@{SITE_IP}:{HUB_MQTT_PORT}"
    common = ["--config", str(config), "--db", f"sqlite:///{hub_db}"]
    run(py, "-m", "hub", "init-db", *common)
    passwords = {}
    for i in range(1, AGENTS + 1):
        out = run(py, "-m", "hub", "add-device", SITE, f"station-{i}", "--new-password", *common,
                  "--broker", hub_broker).stdout
        passwords[f"station-{i}"] = re.search(r"shown only now:\n(\S+)\n", out).group(1)

    # the site: broker on the bridge's address (every client signs in), then the hub
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("per_listener_settings true\n"
                    + render_listener(MQTT_PORT, role="devices", host=SITE_IP, password_file=passwd, acl_file=acl)
                    + render_listener(HUB_MQTT_PORT, role="hub", host=SITE_IP, password_file=auth / "hub.passwd",
                                      acl_file=acl)
                    + "\n".join([
        "persistence false", "max_queued_messages 0", "user root",
        f"log_dest file {procs.logs / 'mosquitto.log'}",  # flushed per line (stdout to a file is not)
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information", "subscribe")),
    ]) + "\n")
    procs.start("broker", network.site, [MOSQUITTO, "-c", str(conf)])
    polling = {"every": 0.5, "check": procs.check}   # fail at once when a process died
    wait_for(lambda: run(
        "ip", "netns", "exec", network.site, "bash", "-c", f"exec 3<>/dev/tcp/{SITE_IP}/{MQTT_PORT}",
        check=False).returncode == 0, 20, "the broker listening", **polling)
    procs.start("hub", network.site, [
        py, "-m", "hub", "serve", *common, "--broker", hub_broker, "--data-dir", str(tmp_path / "hub"),
        "--client-id", HUB_CLIENT, "--host", SITE_IP, "--port", str(WEB_PORT)])
    # agents start once the hub's results subscription stands: before it, the broker answers a result
    # with "no matching subscribers" and the agent keeps it and sends it again 30 s later
    wait_for(lambda: re.search(rf"^\d+: {HUB_CLIENT} 1 \S+/{topics.RESULT}$", procs.tail("mosquitto", 200), re.M),
             60, "the hub subscribed to results", **polling)

    # three stations, each on its own "machine", replaying the plates in a loop
    spools = {d: tmp_path / "spool" / f"{d}.db" for d in network.agents}

    def agent(device: str, *flags: str) -> list[str]:
        return [py, "-m", "agent", "run", "--folder", str(plate_folder), "--cls", "plate", "--package", str(package),
                "--broker", f"mqtt://{SITE_IP}:{MQTT_PORT}", "--site", SITE, "--device", device,
                "--station", f"line-{device.rsplit('-', 1)[1]}", "--runtime", "onnxruntime", "--threads", "1",
                "--spool", str(spools[device]), "--allow-unsigned", *flags]

    def credentials(device: str) -> dict[str, str]:
        return {"KDFLEET_AGENT_USERNAME": f"{device}@{SITE}", "KDFLEET_AGENT_PASSWORD": passwords[device],
                "KDFLEET_AGENT_KEEPALIVE_S": str(keepalive)}

    for device, ns in network.agents.items():
        procs.start(device, ns, agent(device, "--loop", "--fps", str(FPS)), credentials(device))

    t0 = time.monotonic()
    wait_for(lambda: all(online(hub_db).get(d) and results_of(hub_db, d) for d in network.agents),
             ONLINE_TIMEOUT_S, "every device online with a result stored", **polling)
    t_up = time.monotonic() - t0
    time.sleep(3.0)  # a few seconds of normal traffic before the cut

    # (1) the cut: the victim shows offline in the hub's database before the link comes back
    victim, others = VICTIM, [d for d in network.agents if d != VICTIM]
    before_cut = len(results_of(hub_db, victim))
    network.set_link(victim, up=False)
    cut_at, cut_wall = time.monotonic(), datetime.now(UTC)
    try:
        wait_for(lambda: online(hub_db).get(victim) is False, cut_s - 1.0,
                 f"{victim} offline in the hub's database during the cut", **polling)
        offline_after = time.monotonic() - cut_at
        states = online(hub_db)
        assert all(states[d] for d in others), f"only {victim}'s link is cut, yet: {states}"
        assert spool_depth(spools[victim]) > 0, "results made during the cut should wait in the spool"
        time.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
        assert online(hub_db)[victim] is False, f"{victim} came back online while its link was still cut"
        backlog = spool_depth(spools[victim])
    finally:
        restore_at, restore_wall = time.monotonic(), datetime.now(UTC)
        network.set_link(victim, up=True)

    # (2) it reconnects by itself and is online again
    wait_for(lambda: online(hub_db)[victim], RECONNECT_TIMEOUT_S, f"{victim} online again after the restore",
             **polling)
    online_after = time.monotonic() - restore_at
    wait_for(lambda: spool_depth(spools[victim]) < FPS * 2, 60, f"{victim}'s spool drained", **polling)
    drained_after = time.monotonic() - restore_at

    # (3) stop it (SIGTERM delivers what it made first), then count
    assert procs.stop(victim) == 0, procs.tail(victim)
    # every result the agent ever made: its spool's sequence (AUTOINCREMENT never reuses a number)
    produced = query(spools[victim], "SELECT seq FROM sqlite_sequence WHERE name = 'spool'")[0][0]
    assert spool_depth(spools[victim]) == 0, "SIGTERM left results undelivered in the spool"
    assert query(spools[victim], "SELECT reason, count FROM dropped") == [], "the spool dropped results"
    assert produced > before_cut + FPS * cut_s / 2, f"{produced} results: the agent stalled"
    wait_for(lambda: len(results_of(hub_db, victim)) >= produced, 30,
             f"all {produced} of {victim}'s results in the hub", **polling)
    stored = results_of(hub_db, victim)
    ids = [r[0] for r in stored]
    assert len(ids) == len(set(ids)) == produced, f"{len(ids)} stored ({len(set(ids))} ids) of {produced} made"
    # the ones made while the link was down (a second's slack each side) reached the hub only after it came back
    during = [r for r in stored if (r[1] - cut_wall).total_seconds() > 1 and (restore_wall - r[1]).total_seconds() > 1]
    assert len(during) >= FPS * (cut_s - 2) / 2, f"only {len(during)} results made during a {cut_s:.0f} s cut"
    early = [r for r in during if r[2] < restore_wall]
    assert not early, f"{len(early)} results made during the cut reached the hub before the restore"
    # the others went on publishing through the cut
    for d in others:
        arrived = [r for r in results_of(hub_db, d) if cut_wall < r[2] < restore_wall]
        assert len(arrived) >= FPS * cut_s / 3, f"{d}: {len(arrived)} results arrived during the cut"

    print(f"\nnetns fleet: all online {t_up:.1f} s after start; cut {cut_s:.0f} s "
          f"(agent keepalive {keepalive} s); {victim} offline {offline_after:.1f} s "
          f"into the cut, backlog {backlog}; online {online_after:.1f} s after the restore, spool drained "
          f"after {drained_after:.1f} s; {produced} results made, "
          f"{len(stored)} stored once each ({len(during)} made during the cut)")
