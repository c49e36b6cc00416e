"""`kdfleet demo`: a whole site on this machine, from nothing, with one command.

Starts a broker (Mosquitto when installed, else the embedded amqtt) and the hub
at once, so the dashboard is up while the data set is generated and a small
unified model (PatchCore) is fitted (both cached under the work folder), then starts
three simulated stations that replay the test images of one class each (the
classes the model detects best, by the image AUROC in its manifest), and
says which class each streams and which of its images are defective. Like any
provisioned site, the site has a signing key (WORKDIR/keys/site.key, made
once): the hub (WORKDIR/hub.toml) and the stations trust its public key, the
model runs signed by it and is in the registry with a second version beside
it, and the stations follow the hub's desired model, so a rollout of that
version updates them (`kdfleet hub rollout start ID --config WORKDIR/hub.toml`,
as the Models page shows). --data and --package run your own data set and model.

Ctrl-C (or SIGTERM) stops everything in reverse order, in any phase: the
children run in their own sessions, so only the demo hears it and stops them
one kind at a time.

The phases stay in one module, read from top to bottom in the order they run;
the process bookkeeping they share is kdfleet.fleet's.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("kdfleet.demo")

SITE = "demo-plant"
STOP_TIMEOUT_S = 20.0  # a kind of process has this long to stop after SIGTERM before it is killed
GOOD = "good"  # the MVTec layout's folder of defect-free test images


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

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        """Start a child in its own session, its output in WORKDIR/logs/NAME.log: Ctrl-C reaches only
        the demo (or `fleet up`), which stops the children in order."""
        path = self.workdir / "logs" / f"{name}.log"
        with open(path, "ab") as logfile:
            proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env)
        p = Process(name, argv, proc)
        self.procs.append(p)
        log.debug("started %s (pid %s), log: %s", name, proc.pid, path)
        return p

    def check(self) -> None:
        for p in self.procs:
            if p.proc and p.proc.poll() is not None:
                raise SystemExit(f"{p.name} exited with code {p.proc.returncode}; "
                                 f"see {self.workdir / 'logs' / (p.name + '.log')}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM in reverse start order, one kind at a time: the stations (which hand their last
        results to the hub), then the hub's processes, then the broker; SIGKILL after `timeout`."""
        groups: list[list[Process]] = []
        for p in reversed(self.procs):
            kind = p.name.split("-")[0]
            if groups and groups[-1][0].name.split("-")[0] == kind:
                groups[-1].append(p)
            else:
                groups.append([p])
        for group in groups:
            running = [p.proc for p in group if p.proc is not None and p.proc.poll() is None]
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in running:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop within %.0f s of SIGTERM: killed", proc.pid, timeout)
                    proc.kill()
                    proc.wait()


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: a Ctrl-C meant for the demo does not reach the child, which
    the demo ends itself (subprocess.run kills it when the KeyboardInterrupt unwinds)."""
    return subprocess.run(argv, start_new_session=True, **kwargs)


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


def next_version(version: str) -> str:
    """The version after `version`: the minor number up for MAJOR.MINOR.PATCH, else a suffix."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{int(m.group(2)) + 1}.0" if m else f"{version}.1"


def second_version(workdir: Path, package: Path, key: Path) -> Path:
    """The same model as `package` under the next version (its parent the first), signed with the site's
    key: a release to try a rollout with. Made once, in WORKDIR/signed."""
    from shared.package import load_private_key, read_package, write_package

    private = load_private_key(key)
    first = read_package(package, trusted_keys=[private.public_key()])
    version = next_version(first.version)
    out = workdir / "signed" / f"{package.stem}-{version}.kdpkg"
    if out.exists():
        return out
    manifest = first.manifest.as_version(version, parent=first.version)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model = Path(tmp) / "model.onnx"
        model.write_bytes(first.model)
        write_package(out, manifest, model, first.golden, key=private)
    return out


def station_config(path: Path, trusted_key: Path, hub_url: str, token: str) -> Path:
    """An agent config (mode 600: it holds the token) that trusts the site's key and follows the hub's
    desired model; the command line gives the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(f"trusted_keys = [{json.dumps(str(trusted_key))}]\n\n[update]\n"
                    f"hub_url = {json.dumps(hub_url)}\nhub_token = {json.dumps(token)}\n")
    return path


def hub_config(workdir: Path, trusted_key: Path) -> Path:
    """WORKDIR/hub.toml: the demo hub's database, data folder and trusted key, so `kdfleet hub ... --config`
    (the rollout command the Models page shows) reaches the same hub."""
    config, db = workdir / "hub.toml", f"sqlite:///{workdir / 'hub.db'}"
    config.write_text(f"db = {json.dumps(db)}\n"
                      f"data_dir = {json.dumps(str(workdir / 'hub'))}\n"
                      f"trusted_keys = [{json.dumps(str(trusted_key))}]\n")
    return config


def _api(hub_url: str, token: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    request = urllib.request.Request(f"{hub_url.rstrip('/')}{path}", headers=headers, **kwargs)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def register_package(hub_url: str, token: str, package: Path, notes: str = "the site's first model"
                     ) -> dict | None:
    """Upload `package` to the hub's registry (POST /api/models) with an admin token; the registered model,
    or None when it was registered already (an earlier run)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="notes"\r\n\r\n{notes}'
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="package"; filename="{package.name}"'
            "\r\nContent-Type: application/x-tar\r\n\r\n").encode() + package.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    try:
        model = _api(hub_url, token, "/api/models", data=body, method="POST",
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code != 400 or "registered already" not in detail:
            raise SystemExit(f"the hub refused {package}: {exc.code} {detail[:300]}") from None
        return None
    log.info("registered %s %s as model %s", model["name"], model["version"], model["id"])
    return model


def registered(hub_url: str, token: str, package: Path, notes: str) -> dict:
    """The registry's entry for `package`: registered now, or found from an earlier run."""
    from shared.package import read_package

    model = register_package(hub_url, token, package, notes)
    if model is not None:
        return model
    manifest = read_package(package).manifest
    found = _api(hub_url, token, f"/api/models?name={urllib.parse.quote(manifest.model_id)}")["models"]
    return next(m for m in found if m["version"] == manifest.version)


@dataclass
class Tokens:
    """The API tokens the demo makes (`kdfleet hub add-token`), each revoked when no longer needed."""

    py: str
    config: Path
    live: list[str] = field(default_factory=list)

    def new(self, role: str) -> str:
        name = f"demo-{role}-{secrets.token_hex(4)}"
        out = run([self.py, "-m", "hub", "add-token", name, "--role", role, "--config", str(self.config)],
                  capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"hub add-token failed: {(out.stderr or out.stdout).strip()}")
        self.live.append(name)
        return out.stdout.strip().splitlines()[-1]

    def revoke(self, count: int | None = None) -> None:
        """Revoke the newest `count` tokens (all by default), all at once."""
        names = self.live[-count:] if count else list(self.live)
        procs = [subprocess.Popen([self.py, "-m", "hub", "revoke-token", name, "--config", str(self.config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for name in names]
        for p in procs:
            p.wait()
        self.live = [n for n in self.live if n not in names]


def demo_login(py: str, workdir: Path, *hub_args: str) -> tuple[str, str]:
    """The demo's admin account (`hub_args` name the hub's database): created on the first run, its password
    kept (mode 600) in the work folder."""
    user, secret = "demo", workdir / "demo-login.txt"
    if secret.exists():
        return user, secret.read_text().strip()
    password = secrets.token_urlsafe(9)
    run([py, "-m", "hub", "create-admin", user, *hub_args, "--password-stdin"],
        input=password + "\n", text=True, check=True, stdout=subprocess.DEVNULL)
    secret.touch(mode=0o600)
    secret.write_text(password + "\n")
    return user, password


def best_detected_first(data: Path, package: Path) -> list[str]:
    """The classes of `data` the stations replay, those the model detects best (image AUROC in its
    manifest) first: with fewer stations than classes, the demo shows what the model does well."""
    classes = sorted(p.name for p in data.iterdir() if (p / "test").is_dir())
    if not classes:
        raise SystemExit(f"{data} has no CLASS/test folders (the MVTec AD layout)")
    from shared.package import read_package

    measured = read_package(package).manifest.metrics.get("classes", {})
    return sorted(classes, key=lambda c: -(measured.get(c, {}).get("image_auroc") or 0.0))


def what_it_streams(folder: Path) -> str:
    """One line on a class's test folder: how many images, how many of them defective and of which kinds."""
    kinds = Counter(p.parent.name for p in folder.glob("*/*") if p.is_file())
    defects = {k: n for k, n in sorted(kinds.items()) if k != GOOD}
    bad = sum(defects.values())
    kinds_text = ", ".join(f"{k} {n}" for k, n in defects.items())
    return (f"{sum(kinds.values())} images in a loop, {bad} defective ({kinds_text or 'none'}) and {kinds[GOOD]} "
            f"good; a result's Source names its folder ({GOOD}/... is a good part)")


def prepare(py: str, workdir: Path, data: Path | None, package: Path | None) -> tuple[Path, Path]:
    """The data set the stations replay and the model they run: given, or generated and trained once
    (cached in WORKDIR)."""
    if data is None:
        data = workdir / "data"
        if not (data / ".complete").exists():
            log.info("generating the synthetic data set in %s", data)
            run([py, "-m", "trainer", "data", "synth", str(data), "--seed", "0"], check=True,
                stdout=subprocess.DEVNULL)
            (data / ".complete").touch()
    elif not data.is_dir():
        raise SystemExit(f"--data {data}: no such folder")
    if package is None:
        log.info("preparing the demo model (trained once, then cached)")
        out = run([py, "-m", "trainer", "demo-model", str(data), str(workdir / "models")], check=True,
                  stdout=subprocess.PIPE, text=True)
        package = Path(out.stdout.strip().splitlines()[-1])
    elif not package.is_file():
        raise SystemExit(f"--package {package}: no such file")
    return data, package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kdfleet demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("var/demo"), help="cache and state (default: var/demo)")
    ap.add_argument("--port", type=int, default=8080, help="dashboard port (default: 8080)")
    ap.add_argument("--mqtt-port", type=int, default=1883, help="broker port; another free one if taken")
    ap.add_argument("--stations", type=int, default=3, help="simulated stations (default: 3)")
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second per station (default: 2)")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--data", type=Path, help="an MVTec-layout data set to replay (default: the synthetic one)")
    ap.add_argument("--package", type=Path, help="the model to run (default: the demo's, trained on --data)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    workdir = args.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    fleet = Fleet(workdir)
    t0 = time.monotonic()
    py = sys.executable
    tokens: Tokens | None = None

    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        mqtt_port = pick_port(args.mqtt_port)
        fleet.start("broker", broker_argv(workdir, mqtt_port))
        wait_port(mqtt_port, 20, fleet)
        broker_url = f"mqtt://127.0.0.1:{mqtt_port}"
        key = site_key(workdir)
        config = hub_config(workdir, key.with_suffix(".pub"))
        tokens = Tokens(py, config)
        migrated = run([py, "-m", "hub", "init-db", "--config", str(config)], capture_output=True, text=True)
        if migrated.returncode != 0:
            raise SystemExit(f"hub init-db failed: {migrated.stderr.strip()}")
        user, password = demo_login(py, workdir, "--config", str(config))
        fleet.start("hub", [py, "-m", "hub", "serve", "--config", str(config), "--broker", broker_url,
                            "--host", "127.0.0.1", "--port", str(args.port)])
        wait_port(args.port, 60, fleet)
        hub_url = f"http://127.0.0.1:{args.port}"
        station_token = tokens.new("viewer")
        log.info("dashboard: %s  sign in as %s / %s  (stations start once the model is ready)",
                 hub_url, user, password)

        data, package = prepare(py, workdir, args.data.resolve() if args.data else None,
                                args.package.resolve() if args.package else None)
        package = signed_by_site(workdir, package, key)
        admin = tokens.new("admin")
        first = registered(hub_url, admin, package, "the site's first model")
        second = registered(hub_url, admin, second_version(workdir, package, key),
                            f"the same model as {first['version']} under a new version, to try a rollout with")
        tokens.revoke(1)   # the admin token: registering was all it was for
        classes = best_detected_first(data, package)
        for i in range(args.stations):
            cls = classes[i % len(classes)]
            folder = data / cls / "test"
            name = f"station-{i + 1}"
            station = station_config(workdir / "stations" / f"{name}.toml", key.with_suffix(".pub"),
                                     hub_url, station_token)
            fleet.start(name, [
                py, "-m", "agent", "run", "--config", str(station), "--folder", str(folder), "--loop",
                "--package", str(package), "--broker", broker_url, "--site", SITE,
                "--device", name, "--station", f"line-{i + 1}", "--cls", cls,
                "--fps", str(args.fps), "--spool", str(workdir / f"spool-{i + 1}.db")])
            log.info("%s (line-%d) streams %s: %s", name, i + 1, cls, what_it_streams(folder))
        log.info("fleet up in %.0f s: %d stations on %s; dashboard %s (%s / %s); Ctrl-C stops",
                 time.monotonic() - t0, args.stations, broker_url, hub_url, user, password)
        log.info("the stations run %s %s; to try a rollout of %s: kdfleet hub rollout start %s --site %s "
                 "--canary 1 --soak 30 --config %s", first["name"], first["version"], second["version"],
                 second["id"], SITE, config)
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
        # a second Ctrl-C must not leave children behind: the stop runs to its end
        signal.signal(signal.SIGINT, lambda *_: log.info("stopping already; a moment"))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.stop()
        if tokens is not None:
            tokens.revoke()
        log.info("demo stopped")
    return 0
