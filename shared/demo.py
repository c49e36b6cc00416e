"""`kdfleet demo`: a whole site on this machine, from nothing, with one command.

Starts a broker (Mosquitto when installed, else the embedded amqtt) and the hub
at once, so the dashboard is up while the data set is generated and a small
unified model is trained (both cached under the work folder), then starts
three simulated stations that replay the test images. Like any provisioned
site, the site has a signing key (WORKDIR/keys/site.key, made once): the hub
and the stations trust its public key, the model runs signed by it and is in
the registry, and the stations follow the hub's desired model, so a rollout
updates them. Ctrl-C stops everything in reverse order.
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kdfleet.demo")

SITE = "demo-plant"


@dataclass
class Process:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None


@dataclass
class Fleet:
    """Child processes, started in order and stopped in reverse."""

    workdir: Path
    procs: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Process:
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (the child process holds it)
        p = Process(name, argv, subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT))
        self.procs.append(p)
        log.info("started %s (pid %s), log: %s", name, p.proc.pid, logfile.name)
        return p

    def check(self) -> None:
        for p in self.procs:
            if p.proc and p.proc.poll() is not None:
                raise SystemExit(f"{p.name} exited with code {p.proc.returncode}; "
                                 f"see {self.workdir / 'logs' / (p.name + '.log')}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.proc and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGINT)
        for p in reversed(self.procs):
            if p.proc:
                try:
                    p.proc.wait(10)
                except subprocess.TimeoutExpired:
                    p.proc.kill()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_port(port: int, timeout: float, fleet: Fleet) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check()
        try:
            socket.create_connection(("127.0.0.1", port), 0.3).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port} after {timeout:.0f} s")


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_argv(workdir: Path, port: int) -> list[str]:
    """Mosquitto when installed (MQTT 5), else the embedded pure-Python amqtt (MQTT 3.1.1)."""
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if mosquitto:
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        return [mosquitto, "-c", str(conf)]
    conf = workdir / "amqtt.yaml"
    conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n"
                    "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
    return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]


def site_key(workdir: Path, key: Path | None = None) -> Path:
    """The site's private signing key: `key`, else WORKDIR/keys/site.key (made on the first run, mode 600,
    with site.pub beside it, as `kdfleet keys new` writes them)."""
    from shared.package import new_key, save_keypair

    if key is None:
        key = workdir / "keys" / "site.key"
        if not key.exists():
            save_keypair(new_key(), key)
            log.info("made the site's signing key %s (public key %s)", key, key.with_suffix(".pub"))
    if not key.with_suffix(".pub").exists():
        raise SystemExit(f"{key.with_suffix('.pub')} is missing: the public key beside {key} "
                         "(`kdfleet keys new` writes both)")
    return key


def signed_by_site(workdir: Path, package: Path, key: Path) -> Path:
    """`package` if the site's `key` signed it, else a copy in WORKDIR/signed signed with it."""
    from shared.package import PackageError, load_private_key, read_package, sign_package

    private = load_private_key(key)
    try:
        read_package(package, trusted_keys=[private.public_key()])
        return package
    except PackageError:
        pass   # unsigned, or signed by another key
    signed = workdir / "signed" / package.name
    signed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package, signed)
    sign_package(signed, private)
    log.info("signed a copy of %s with the site's key: %s", package, signed)
    return signed


def station_config(path: Path, trusted_key: Path, hub_url: str, token: str) -> Path:
    """An agent config (mode 600: it holds the token) that trusts the site's key and follows the hub's
    desired model; the command line gives the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(f"trusted_keys = [{json.dumps(str(trusted_key))}]\n\n[update]\n"
                    f"hub_url = {json.dumps(hub_url)}\nhub_token = {json.dumps(token)}\n")
    return path


def register_package(hub_url: str, token: str, package: Path) -> dict | None:
    """Upload `package` to the hub's registry (POST /api/models) with an admin token; the registered model,
    or None when it was registered already (an earlier run)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="notes"\r\n\r\nthe site\'s first model'
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="package"; filename="{package.name}"'
            "\r\nContent-Type: application/x-tar\r\n\r\n").encode() + package.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{hub_url.rstrip('/')}/api/models", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            model = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code != 400 or "registered already" not in detail:
            raise SystemExit(f"the hub refused {package}: {exc.code} {detail[:300]}") from None
        return None
    log.info("registered %s %s as model %s", model["name"], model["version"], model["id"])
    return model


def hub_token(py: str, name: str, role: str, db_url: str, *config: str) -> str:
    """A new API token from `kdfleet hub add-token` (printed last); revoke it with `revoke_token`."""
    out = subprocess.run([py, "-m", "hub", "add-token", name, "--role", role, "--db", db_url, *config],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"hub add-token failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip().splitlines()[-1]


def revoke_token(py: str, name: str, db_url: str, *config: str) -> None:
    subprocess.run([py, "-m", "hub", "revoke-token", name, "--db", db_url, *config], capture_output=True)


def demo_login(py: str, db_url: str, workdir: Path) -> tuple[str, str]:
    """The demo's admin account: created on the first run, its password kept (mode 600) in the work folder."""
    user, secret = "demo", workdir / "demo-login.txt"
    if secret.exists():
        return user, secret.read_text().strip()
    password = secrets.token_urlsafe(9)
    subprocess.run([py, "-m", "hub", "create-admin", user, "--db", db_url, "--password-stdin"],
                   input=password + "\n", text=True, check=True, stdout=subprocess.DEVNULL)
    secret.touch(mode=0o600)
    secret.write_text(password + "\n")
    return user, password


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kdfleet demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("var/demo"), help="cache and state (default: var/demo)")
    ap.add_argument("--port", type=int, default=8080, help="dashboard port (default: 8080)")
    ap.add_argument("--mqtt-port", type=int, default=1883, help="broker port; another free one if taken")
    ap.add_argument("--stations", type=int, default=3, help="simulated stations (default: 3)")
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second per station (default: 2)")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    workdir = args.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    fleet = Fleet(workdir)
    t0 = time.monotonic()
    py = sys.executable
    db_url = f"sqlite:///{workdir / 'hub.db'}"
    tokens = [f"demo-stations-{secrets.token_hex(4)}", f"demo-admin-{secrets.token_hex(4)}"]
    try:
        mqtt_port = pick_port(args.mqtt_port)
        fleet.start("broker", broker_argv(workdir, mqtt_port))
        wait_port(mqtt_port, 20, fleet)
        broker_url = f"mqtt://127.0.0.1:{mqtt_port}"
        subprocess.run([py, "-m", "hub", "init-db", "--db", db_url], check=True, stdout=subprocess.DEVNULL)
        user, password = demo_login(py, db_url, workdir)
        key = site_key(workdir)
        fleet.start("hub", [py, "-m", "hub", "serve", "--db", db_url,
                            "--broker", broker_url, "--data-dir", str(workdir / "hub"),
                            "--host", "127.0.0.1", "--port", str(args.port),
                            "--trusted-key", str(key.with_suffix(".pub"))])
        wait_port(args.port, 60, fleet)
        hub_url = f"http://127.0.0.1:{args.port}"
        station_token = hub_token(py, tokens[0], "viewer", db_url)
        log.info("dashboard: http://127.0.0.1:%d  sign in as %s / %s  (stations start once the model is ready)",
                 args.port, user, password)

        data = workdir / "data"
        if not (data / ".complete").exists():
            log.info("generating the synthetic data set in %s", data)
            subprocess.run([py, "-m", "trainer", "data", "synth", str(data), "--seed", "0"], check=True)
            (data / ".complete").touch()
        log.info("preparing the demo model (trained once, then cached)")
        out = subprocess.run([py, "-m", "trainer", "demo-model", str(data), str(workdir / "models")],
                             check=True, stdout=subprocess.PIPE, text=True)
        package = signed_by_site(workdir, Path(out.stdout.strip().splitlines()[-1]), key)
        register_package(hub_url, hub_token(py, tokens[1], "admin", db_url), package)
        revoke_token(py, tokens[1], db_url)
        classes = sorted(p.name for p in data.iterdir() if (p / "test").is_dir())
        for i in range(args.stations):
            cls = classes[i % len(classes)]
            config = station_config(workdir / "stations" / f"station-{i + 1}.toml", key.with_suffix(".pub"),
                                    hub_url, station_token)
            fleet.start(f"station-{i + 1}", [
                py, "-m", "agent", "run", "--config", str(config), "--folder", str(data / cls / "test"), "--loop",
                "--package", str(package), "--broker", broker_url, "--site", SITE,
                "--device", f"station-{i + 1}", "--station", f"line-{i + 1}", "--cls", cls,
                "--fps", str(args.fps), "--spool", str(workdir / f"spool-{i + 1}.db")])
        log.info("fleet up in %.0f s: %d stations on %s; dashboard http://127.0.0.1:%d (%s / %s); Ctrl-C stops",
                 time.monotonic() - t0, args.stations, broker_url, args.port, user, password)
        deadline = time.monotonic() + args.duration if args.duration > 0 else float("inf")
        while time.monotonic() < deadline:
            fleet.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping")
    except subprocess.CalledProcessError as exc:
        log.error("%s failed with code %s", " ".join(map(str, exc.cmd[:4])), exc.returncode)
        return 1
    finally:
        fleet.stop()
        if (workdir / "hub.db").exists():
            for name in tokens:
                revoke_token(py, name, db_url)
    return 0
