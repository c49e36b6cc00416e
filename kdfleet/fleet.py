"""`kdfleet fleet`: one whole site as local processes, with the security of a real one.

    kdfleet fleet up --agents 3 [--package PKG --data FOLDER --cls CLASS]   # until Ctrl-C
    kdfleet fleet status                                                   # from another terminal
    kdfleet fleet down

`up` starts a private Mosquitto whose password file and ACL the hub's provisioning writes
(anonymous clients refused; the embedded amqtt, without authentication, when Mosquitto is
not installed), the hub (`hub serve`: web + one ingest worker, plus `--ingest-workers` more)
and N agents replaying a data set folder, each signed in with its own device credentials
from `kdfleet hub add-device`. Without --package it uses the demo's model and data (trained
and generated once, cached under var/demo, as `kdfleet demo` does). It prints the dashboard
URL and login, writes WORKDIR/fleet.json for `status` and `down`, and stops everything in
reverse order (agents, hub, broker) on Ctrl-C, SIGTERM or `fleet down`.

Like a provisioned site, the fleet has a signing key (--key, else WORKDIR/keys/site.key, made
once): the hub (WORKDIR/hub.toml) and every agent trust its public key, the agents run the
package signed by it (a copy is signed when it is not) and follow the hub's desired model
(WORKDIR/agents/DEVICE.toml), and the package is in the registry. A rollout then works as on
a plant: sign the new package with the site's key, upload it, and
`kdfleet hub rollout start MODEL_ID --site SITE --config WORKDIR/hub.toml`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdfleet.demo import (
    Fleet,
    broker_argv,
    demo_login,
    pick_port,
    prepare,
    register_package,
    signed_by_site,
    site_key,
    station_config,
    wait_port,
)
from kdfleet.fleet_state import (
    STATE_FILE,
    ProcessRecord,
    alive,
    hub_view,
    read_state,
    start_ticks,
    wait_online,
    write_state,
)
from kdfleet.fleet_state import parse_metrics as parse_metrics  # bench.fleet reads the hub's /metrics with it
from shared.logs import add_log_arguments, json_wanted, setup_logging

log = logging.getLogger("kdfleet.fleet")

HUB_USER = "kdfleet-hub"
PROVISION_THREADS = 4  # add-device processes at once (each rewrites the files; one final rewrite fixes races)
SILENT_AFTER_S = 30  # the fleet's hub shows a device silent after this long without news


# -- helpers ------------------------------------------------------------------------


def run_hub(py: str, args: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
    """`python -m hub ARGS`; its stdout. A failure raises SystemExit with the hub's own message."""
    out = subprocess.run([py, "-m", "hub", *args], input=stdin, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"hub {args[0]} failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def private_file(path: Path, make: Any) -> str:
    """The secret in `path`, created with `make()` (mode 0600) the first time."""
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(make() + "\n")
    return path.read_text().strip()


def mosquitto_binary() -> str | None:
    for candidate in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).exists():
            return candidate
    return None


def mosquitto_conf(workdir: Path, port: int, hub_port: int, auth: Path) -> Path:
    """The private broker's config: loopback only, every client signs in (deploy/mosquitto's rules):
    the stations on `port`, each under its user name as client id, the hub's account alone on `hub_port`."""
    conf = workdir / "mosquitto.conf"
    (workdir / "mosquitto-data").mkdir(exist_ok=True)
    lines = [
        "per_listener_settings true",
        f"listener {port} 127.0.0.1",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"password_file {auth / 'passwd'}",
        f"acl_file {auth / 'acl'}",
        f"listener {hub_port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {auth / 'hub.passwd'}",
        f"acl_file {auth / 'acl'}",
        "persistence true",
        f"persistence_location {workdir / 'mosquitto-data'}/",
        "max_queued_messages 0",  # the hub's session keeps its backlog (docs/hub.md)
        "log_dest stdout",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to the mosquitto user, who may not read WORKDIR
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start(fleet: Fleet, name: str, argv: list[str], env: dict[str, str] | None = None) -> ProcessRecord:
    """Start a child in its own session (Ctrl-C reaches only `up`, which stops them in order)."""
    proc = fleet.start(name, argv, {**os.environ, **(env or {})}).proc
    assert proc is not None
    ticks = start_ticks(proc.pid)
    return ProcessRecord(name, proc.pid, ticks if ticks is not None else -1,
                         str(fleet.workdir / "logs" / f"{name}.log"))


def demo_model(py: str, cache: Path) -> tuple[Path, Path]:
    """The demo's data set and model (generated and trained once, cached in `cache`)."""
    return prepare(py, cache, None, None)


def sources(data: Path, cls: str | None, n: int) -> list[tuple[Path, str]]:
    """(folder, class) per agent: an MVTec-layout root gives its classes' test folders in turn;
    any other folder is replayed as one class, named by --cls."""
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such folder")
    if cls:
        return [(data, cls)] * n
    classes = sorted(p.name for p in data.iterdir() if (p / "test").is_dir())
    if not classes:
        raise SystemExit(f"--data {data} has no CLASS/test folders (MVTec layout): name the class it shows with --cls")
    return [(data / classes[i % len(classes)] / "test", classes[i % len(classes)]) for i in range(n)]


# -- commands -----------------------------------------------------------------------


def up(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    state = read_state(workdir)
    if state and alive(ProcessRecord(**state["supervisor"])):
        raise SystemExit(f"a fleet runs from {workdir} already (pid {state['supervisor']['pid']}); "
                         f"stop it with `kdfleet fleet down --workdir {args.workdir}`")
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    py, t0 = sys.executable, time.monotonic()
    site = args.site
    if args.package is None:
        data, package = demo_model(py, Path("var/demo").resolve())
        data = args.data or data
    else:
        package, data = args.package.resolve(), args.data
        if data is None:
            raise SystemExit("--package needs --data: the folder the agents replay")
        if not package.is_file():
            raise SystemExit(f"--package {package}: no such file")
    plan = sources(data.resolve(), args.cls, args.agents)
    key = site_key(workdir, args.key.resolve() if args.key else None)
    package = signed_by_site(workdir, package, key)

    db_url = args.db or f"sqlite:///{workdir / 'hub.db'}"
    hub_password = private_file(workdir / "hub-mqtt-password", lambda: os.urandom(18).hex())
    auth = workdir / "mosquitto"
    config = workdir / "hub.toml"
    config.write_text(f"db = {json.dumps(db_url)}\ndata_dir = {json.dumps(str(workdir / 'hub'))}\n"
                      f"trusted_keys = [{json.dumps(str(key.with_suffix('.pub')))}]\n\n"
                      f"[web]\nsilent_after_s = {SILENT_AFTER_S}\n\n"
                      f"[mqtt_auth]\npassword_file = {json.dumps(str(auth / 'passwd'))}\n"
                      f"acl_file = {json.dumps(str(auth / 'acl'))}\n")
    mqtt_port = pick_port(args.mqtt_port)
    mosquitto = mosquitto_binary()
    # the hub's own listener; amqtt has one listener for all (and checks no passwords)
    hub_port = pick_port(mqtt_port + 1) if mosquitto else mqtt_port
    broker = f"mqtt://{HUB_USER}:{hub_password}@127.0.0.1:{hub_port}"
    common = ["--config", str(config), "--db", db_url]
    run_hub(py, ["init-db", *common])
    user, password = demo_login(py, workdir, *common)
    token_name = f"fleet-{os.getpid()}"
    token = run_hub(py, ["add-token", token_name, "--role", "viewer", *common]).strip().splitlines()[-1]

    devices = [f"station-{i + 1}" for i in range(args.agents)]

    def provision(device: str) -> str:
        out = run_hub(py, ["add-device", site, device, "--new-password", *common, "--broker", broker])
        return re.search(r"shown only now:\n(\S+)\n", out).group(1)

    with ThreadPoolExecutor(PROVISION_THREADS) as pool:
        passwords = dict(zip(devices, pool.map(provision, devices), strict=True))
    run_hub(py, ["write-mqtt-auth", *common, "--broker", broker])  # after the parallel rewrites
    t_provisioned = time.monotonic()

    fleet = Fleet(workdir)
    records: list[ProcessRecord] = []
    me = ProcessRecord("fleet up", os.getpid(), start_ticks(os.getpid()) or -1, "")
    port = pick_port(args.port)
    dashboard = f"http://127.0.0.1:{port}/"
    state = {"supervisor": asdict(me), "workdir": str(workdir), "site": site, "db": db_url,
             "dashboard": dashboard, "user": user, "token": token, "token_name": token_name,
             "broker": f"mqtt://127.0.0.1:{mqtt_port}", "devices": devices, "processes": []}
    child_env = {"KDFLEET_LOG_JSON": "1"} if args.log_json else {}
    log_flags = ["--log-json"] if args.log_json else []

    def started(record: ProcessRecord) -> None:
        records.append(record)
        state["processes"] = [asdict(r) for r in records]
        write_state(workdir, state)

    stop_requested = False

    def on_sigterm(*_: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if mosquitto:
            argv = [mosquitto, "-c", str(mosquitto_conf(workdir, mqtt_port, hub_port, auth))]
        else:
            log.warning("Mosquitto is not installed: using the embedded amqtt broker, which checks no "
                        "passwords (apt-get install mosquitto for the real thing)")
            argv = broker_argv(workdir, mqtt_port)
        started(start(fleet, "broker", argv, child_env))
        wait_port(mqtt_port, 20, fleet)
        hub_args = [*common, "--broker", broker, "--data-dir", str(workdir / "hub"), *log_flags]
        started(start(fleet, "hub", [py, "-m", "hub", "serve", *hub_args, "--client-id", "kdfleet-fleet-web",
                                     "--host", "127.0.0.1", "--port", str(port)], child_env))
        for k in range(args.ingest_workers):
            started(start(fleet, f"ingest-{k + 1}", [py, "-m", "hub", "ingest", *hub_args,
                                                     "--client-id", f"kdfleet-fleet-ingest-{k + 1}"], child_env))
        t_agents = time.monotonic()
        for i, (device, (folder, cls)) in enumerate(zip(devices, plan, strict=True)):
            env = {**child_env, "KDFLEET_AGENT_USERNAME": f"{device}@{site}",
                   "KDFLEET_AGENT_PASSWORD": passwords[device]}
            agent_config = station_config(workdir / "agents" / f"{device}.toml", key.with_suffix(".pub"),
                                          dashboard, token)
            started(start(fleet, device, [
                py, "-m", "agent", "run", "--config", str(agent_config), "--folder", str(folder), "--loop",
                "--cls", cls,
                "--package", str(package), "--broker", f"mqtt://127.0.0.1:{mqtt_port}", "--site", site,
                "--device", device, "--station", f"line-{i + 1}", "--fps", str(args.fps),
                "--spool", str(workdir / "spool" / f"{device}.db")], env))
        wait_port(port, 60, fleet)
        admin_name = f"fleet-admin-{os.getpid()}"
        admin = run_hub(py, ["add-token", admin_name, "--role", "admin", *common]).strip().splitlines()[-1]
        try:
            register_package(dashboard, admin, package)   # what the site runs, so a rollback can return to it
        finally:
            run_hub(py, ["revoke-token", admin_name, *common], check=False)
        log.info("dashboard: %s  sign in as %s / %s", dashboard, user, password)
        online_at = wait_online(state, fleet, args.agents, args.online_timeout)
        timing = {"provisioning_s": round(t_provisioned - t0, 2), "agents_started_s": round(t_agents - t0, 2),
                  "all_online_s": round(online_at - t0, 2) if online_at else None}
        state["timing"] = timing
        write_state(workdir, state)
        log.info("fleet up: %d agents on %s, %s online after %.1f s (provisioned in %.1f s); dashboard %s "
                 "(%s / %s); logs in %s; `kdfleet fleet status` / `kdfleet fleet down --workdir %s`, or Ctrl-C",
                 args.agents, state["broker"], "all" if online_at else "NOT all", time.monotonic() - t0,
                 t_provisioned - t0, dashboard, user, password, workdir / "logs", args.workdir)
        log.info("updates: sign packages with %s, upload them (POST /api/models, an admin token from "
                 "`kdfleet hub add-token NAME --role admin --config %s`), then `kdfleet hub rollout start MODEL_ID "
                 "--site %s --config %s`", key, config, site, config)
        deadline = time.monotonic() + args.duration if args.duration > 0 else float("inf")
        while time.monotonic() < deadline:
            fleet.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping (%s)", "SIGTERM" if stop_requested else "Ctrl-C")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second `down` cannot cut the shutdown short
        fleet.stop()
        run_hub(py, ["revoke-token", token_name, *common], check=False)
        (workdir / STATE_FILE).unlink(missing_ok=True)
        log.info("fleet stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    state = read_state(workdir)
    if state is None:
        print(f"no fleet runs from {workdir} (no {STATE_FILE}); start one with `kdfleet fleet up`")
        return 1
    processes = [dict(r) | {"alive": alive(ProcessRecord(**r))} for r in [state["supervisor"], *state["processes"]]]
    try:
        view: dict[str, Any] = hub_view(state) | {"hub": "up"}
    except (OSError, ValueError) as exc:
        view = {"hub": f"not answering at {state['dashboard']}: {exc}", "devices": []}
    if args.json:
        print(json.dumps({"dashboard": state["dashboard"], "site": state["site"], "processes": processes,
                          "timing": state.get("timing"), **view}, indent=2))
        return 0
    print(f"fleet in {workdir}: site {state['site']}, dashboard {state['dashboard']} (user {state['user']}, "
          f"password in {workdir / 'demo-login.txt'})")
    for p in processes:
        print(f"  {p['name']:<14} pid {p['pid']:<8} {'running' if p['alive'] else 'GONE'}  {p['log']}")
    print(f"hub: {view['hub']}")
    if view.get("ingest_rate") is not None:
        lag = "" if view.get("lag_avg_s") is None else (
            f", lag avg {view['lag_avg_s']:.2f} s, max {view['lag_max_s']:.2f} s")
        print(f"ingest: {view['ingest_rate']:.1f} results/s over the last minute{lag}")
    for d in view["devices"]:
        print(f"  {d['device']:<14} {d['state']:<8} last seen {d['last_seen'] or '-'}  "
              f"{d['results_last_minute']} results in the last minute, spool {d['spool_depth']}")
    return 0


def down(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    state = read_state(workdir)
    if state is None:
        print(f"no fleet runs from {workdir}")
        return 0
    supervisor = ProcessRecord(**state["supervisor"])
    if alive(supervisor):
        os.kill(supervisor.pid, signal.SIGTERM)  # it stops its children in reverse order
        deadline = time.monotonic() + args.timeout
        while alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    # whatever is left (the supervisor was killed, or did not finish in time): stop it here
    left = [ProcessRecord(**r) for r in reversed(state["processes"]) if alive(ProcessRecord(**r))]
    for r in left + ([supervisor] if alive(supervisor) else []):
        os.kill(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(alive(r) for r in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    for r in left:
        if alive(r):
            os.kill(r.pid, signal.SIGKILL)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    print(f"fleet in {workdir} stopped" + (f" ({len(left)} processes stopped here)" if left else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdfleet fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="start broker, hub and N agents; stop them on Ctrl-C")
    p.set_defaults(handler=up)
    p.add_argument("--agents", type=int, default=3, help="simulated stations (default 3)")
    p.add_argument("--package", type=Path, help="model package (.kdpkg); default: the demo's model")
    p.add_argument("--key", type=Path, help="the site's private signing key (`kdfleet keys new`, with its .pub "
                   "beside it); default WORKDIR/keys/site.key, made on the first run")
    p.add_argument("--data", type=Path, help="an MVTec-layout root (agents take its classes in turn) or, "
                   "with --cls, one folder of frames; default: the demo's data set")
    p.add_argument("--cls", help="the class the --data folder shows")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second per agent (default 2)")
    p.add_argument("--site", default="fleet", help="site name (default fleet)")
    p.add_argument("--db", help="hub database URL (default sqlite:///WORKDIR/hub.db)")
    p.add_argument("--port", type=int, default=8080, help="dashboard port; another free one if taken")
    p.add_argument("--mqtt-port", type=int, default=1883, help="broker port; another free one if taken")
    p.add_argument("--ingest-workers", type=int, default=0, help="`hub ingest` processes besides the hub's own")
    p.add_argument("--online-timeout", type=float, default=120.0, help="seconds to wait for every device")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until stopped)")
    add_log_arguments(p)
    for name, text in (("status", "each process and each device's state from the hub"),
                       ("down", "stop the fleet `up` started")):
        q = sub.add_parser(name, help=text)
        q.set_defaults(handler=status if name == "status" else down)
        q.add_argument("--workdir", type=Path, default=Path("var/fleet"), help="default var/fleet")
        if name == "status":
            q.add_argument("--json", action="store_true", help="one JSON object")
        else:
            q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for `up` to stop")
    p.add_argument("--workdir", type=Path, default=Path("var/fleet"), help="state, logs, database (default var/fleet)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_json", None) or json_wanted(), "INFO")
    if args.command == "up" and args.agents < 1:
        raise SystemExit("--agents must be at least 1")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
