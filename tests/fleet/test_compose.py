"""compose.yaml against the code: Compose accepts it, and every command, flag, port, path,
secret, environment variable and file it names exists where it says.

The commands are parsed by the real argparse parsers of the commands they run (stopped right
after parsing); the config files are loaded by the real strict loaders; the broker's config
runs under a real Mosquitto with a password file and ACL written by the hub's provisioning.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
# bind-mounted folders the operator fills (training data, frames, model packages, the site's public key):
# not in git
OPERATOR_FOLDERS = {"data", "images", "keys", "models"}
LONG_RUNNING = {"postgres", "mosquitto", "hub", "hub-ingest", "agent", "agent-jetson"}
NEEDS_HEALTHCHECK = {"postgres", "mosquitto", "hub"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """`docker-compose config`: the file as Compose reads it (anchors merged, paths absolute)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    out = subprocess.run([binary, "-f", str(COMPOSE), "config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"docker-compose refused compose.yaml:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@dataclass
class Mounts:
    """A service's mounts: container path -> host path (bind) or volume name."""

    binds: dict[PurePosixPath, Path] = field(default_factory=dict)
    volumes: dict[PurePosixPath, str] = field(default_factory=dict)

    def host_path(self, inside: str) -> Path | None:
        """Where a container path lies on the host, through a bind mount; None if not bound."""
        p = PurePosixPath(inside)
        for target, source in self.binds.items():
            if p == target or target in p.parents:
                return source / p.relative_to(target)
        return None

    def volume_of(self, inside: str) -> str | None:
        p = PurePosixPath(inside)
        for target, name in self.volumes.items():
            if p == target or target in p.parents:
                return name
        return None

    def covers(self, inside: str) -> bool:
        return self.host_path(inside) is not None or self.volume_of(inside) is not None


def mounts(service: dict[str, Any]) -> Mounts:
    m = Mounts()
    for v in service.get("volumes", []):
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        if source.startswith("/"):
            m.binds[PurePosixPath(target)] = Path(source)
        else:
            m.volumes[PurePosixPath(target)] = source
    for s in service.get("secrets", []):
        name = s["source"] if isinstance(s, dict) else s
        m.binds[PurePosixPath("/run/secrets") / name] = Path("/run/secrets") / name  # checked apart
    return m


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]  # assignments in front of the command
    secrets: list[str]  # files read with $(cat FILE)


def commands(service: dict[str, Any]) -> list[Command]:
    """The commands a service runs: its argv, or each step of an `sh -c` script."""
    command = service.get("command")
    if command is None:
        return []
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] != ["sh", "-c"]:
        return [Command(argv, {}, [])]
    out = []
    for step in re.split(r"&&|;|\n", argv[2].replace("$$", "$")):
        step = step.strip()
        if not step or step.startswith("("):
            continue  # a subshell of system tools (getent, groupadd)
        secrets = re.findall(r"\$\(cat ([^)]+)\)", step)
        words = shlex.split(re.sub(r"\$\(cat [^)]+\)", "SECRET", step))
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words and words[0] == "exec":
            words.pop(0)
        out.append(Command(words, env, secrets))
    return out


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@contextmanager
def parse_only() -> Iterator[None]:
    """Commands run only as far as parsing their arguments: Parsed carries the namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse)
        yield


def parse_kdfleet(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, namespace) of a `kdfleet ...` or `python -m hub|agent ...` command line."""
    from kdfleet.cli import COMMANDS, main

    if argv[:2] == ["python", "-m"]:
        assert argv[2] in ("hub", "agent", "trainer"), f"unknown module in {argv}"
        argv = ["kdfleet", argv[2], *argv[3:]]
    assert argv[0] == "kdfleet", f"not a kdfleet command: {argv}"
    assert argv[1] in COMMANDS, f"`kdfleet {argv[1]}` is not in kdfleet/cli.py COMMANDS"
    try:
        with parse_only():
            main(argv[1:])
    except Parsed as parsed:
        return argv[1], parsed.namespace
    except SystemExit as exc:
        raise AssertionError(f"{shlex.join(argv)}: its parser refused the arguments (exit {exc.code})") from None
    raise AssertionError(f"{shlex.join(argv)} never parsed its arguments")


def kdfleet_commands(compose: dict[str, Any]) -> Iterator[tuple[str, Command, str, argparse.Namespace]]:
    for name, service in compose["services"].items():
        for c in commands(service):
            if c.argv[0] == "kdfleet" or c.argv[:2] == ["python", "-m"]:
                command, ns = parse_kdfleet(c.argv)
                yield name, c, command, ns


def test_compose_accepts_the_file_and_has_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"postgres", "mosquitto", "hub-init", "hub", "hub-ingest", "trainer", "agent", "agent-jetson"}
    assert expected <= set(services)
    assert services["agent"]["profiles"] == ["cpu"]
    assert services["agent-jetson"]["profiles"] == ["jetson"]
    assert services["trainer"]["profiles"] == ["training"]
    assert services["seaweedfs"]["profiles"] == services["hub-2"]["profiles"] == ["multihost"]
    for name in LONG_RUNNING:
        assert services[name].get("restart") == "unless-stopped", f"{name} has no restart policy"
    for name in NEEDS_HEALTHCHECK:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_every_kdfleet_command_and_flag_exists(compose: dict[str, Any]) -> None:
    seen = {name: command for name, _, command, _ in kdfleet_commands(compose)}
    # every service built from this repository runs a kdfleet command
    for name, service in compose["services"].items():
        if "build" in service:
            assert name in seen, f"service {name} runs no kdfleet command: {service.get('command')}"
    assert seen["trainer"] == "train" and seen["agent"] == "agent" and seen["hub"] == "hub"


def test_hub_commands_match_the_hub_config_ports_and_broker(compose: dict[str, Any]) -> None:
    from hub.config import load as load_hub

    services = compose["services"]
    client_ids = []
    for name, c, command, ns in kdfleet_commands(compose):
        if command != "hub":
            continue
        m = mounts(services[name])
        if ns.command == "make-certs":
            assert m.volume_of(ns.dir) == "broker-tls" and "mosquitto" in ns.host, (name, ns)
            assert ns.group == "mosquitto", "the broker reads its key as the mosquitto group"
            continue
        if ns.config:
            path = m.host_path(ns.config)
            assert path is not None and path.is_file(), f"{name}: --config {ns.config} is mounted from no file"
            cfg = load_hub(path)
            cfg.validate()
            if ns.command in ("serve", "ingest"):
                assert m.volume_of(cfg.data_dir) == "hub-data", f"{name}: data_dir {cfg.data_dir} is not on hub-data"
            if ns.command == "serve":   # uploads must be signed: the keys it trusts are mounted
                assert cfg.trusted_keys and not cfg.allow_unsigned, f"{name}: hub.toml trusts no key"
                for key in cfg.trusted_keys:
                    assert m.host_path(key) is not None, f"{name}: trusted key {key} is not mounted"
            if ns.command in ("serve", "write-mqtt-auth", "add-device"):
                assert m.volume_of(cfg.mqtt_auth.password_file) == "mosquitto-auth", name
                assert m.volume_of(cfg.mqtt_auth.hub_passwords()) == "mosquitto-auth", name
                assert m.volume_of(cfg.mqtt_auth.acl_file) == "mosquitto-auth", name
            if ns.command in ("serve", "ingest"):
                assert m.volume_of(cfg.broker_tls.ca_file) == "broker-tls", f"{name}: the CA is not mounted"
            if cfg.images.backend == "s3":
                assert m.covers(cfg.images.credentials_file), f"{name}: {cfg.images.credentials_file} is not mounted"
                endpoint = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", cfg.images.endpoint)
                store = services[endpoint.group(1)]
                assert f"-s3.port={endpoint.group(2)}" in store["command"], (cfg.images.endpoint, store["command"])
        if getattr(ns, "broker", None):
            # the hub's own TLS listener (deploy/mosquitto/mosquitto.conf)
            assert re.fullmatch(r"mqtts://kdfleet-hub:SECRET@mosquitto:8884", ns.broker), ns.broker
            assert c.secrets == ["/run/secrets/hub_mqtt_password"], c.secrets
        if getattr(ns, "broker", None) is None and ns.command != "init-db":
            raise AssertionError(f"{name}: hub {ns.command} needs --broker with the hub's account")
        if ns.db:
            assert ns.db.startswith("postgresql+psycopg://kdfleet@postgres/kdfleet"), ns.db
            env = services[name]["environment"]
            assert env["PGPASSFILE"] == "/run/secrets/pgpass" and "pgpass" in _secret_names(services[name])
        for s in c.secrets:
            assert PurePosixPath(s).name in _secret_names(services[name]), f"{name} reads {s} but has no such secret"
        if ns.command == "serve":
            ports = services[name]["ports"]
            assert any(str(p.get("target")) == str(ns.port) for p in ports), f"hub --port {ns.port} vs {ports}"
            assert f":{ns.port}/" in " ".join(services[name]["healthcheck"]["test"])
            assert ns.host == "0.0.0.0"
        if ns.command in ("serve", "ingest"):
            assert ns.log_json, f"{name}: long-running hub commands log JSON lines (--log-json)"
            client_ids.append(ns.client_id)
    assert len(client_ids) == 3 and len(set(client_ids)) == 3, f"ingest client ids must differ: {client_ids}"


def _secret_names(service: dict[str, Any]) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])}


def test_agent_configs_load_and_point_at_mounted_paths(compose: dict[str, Any]) -> None:
    from agent.config import ENV_PREFIX, AgentConfig
    from agent.config import load as load_agent
    from hub.services.devices import mqtt_username
    from shared.logs import ENV as LOG_ENV

    services = compose["services"]
    mosquitto_port = int(services["mosquitto"]["ports"][0]["target"])
    agents = [(n, c, ns) for n, c, cmd, ns in kdfleet_commands(compose) if cmd == "agent"]
    assert {n for n, _, _ in agents} == {"agent", "agent-jetson"}
    fields = {f.upper() for f in AgentConfig.__dataclass_fields__}
    for name, c, _ns in agents:
        service, m = services[name], mounts(services[name])
        config = c.argv[c.argv.index("--config") + 1]
        path = m.host_path(config)
        assert path is not None and path.is_file(), f"{name}: --config {config} is mounted from no file"
        env = {**service.get("environment", {}), **c.env}
        for key in env:
            assert key == LOG_ENV or (key.startswith(ENV_PREFIX) and key.removeprefix(ENV_PREFIX) in fields), (
                f"{name}: environment variable {key} is read by nothing")
        assert c.env["KDFLEET_AGENT_PASSWORD"] == "SECRET" and c.secrets == ["/run/secrets/agent_mqtt_password"]
        assert "agent_mqtt_password" in _secret_names(service)
        cfg = load_agent(path, {"runtime": "tensorrt" if "--runtime" in c.argv else None}, environ=env)
        assert cfg.username == mqtt_username(cfg.site, cfg.device), "username must be DEVICE@SITE"
        broker = cfg.broker_config()
        assert broker.host == "mosquitto" and broker.port == mosquitto_port and broker.tls
        assert m.volume_of(broker.ca_file) == "broker-tls", f"{name}: ca_file {broker.ca_file} is not mounted"
        assert m.volume_of(cfg.spool.path) == "agent-spool", f"{name}: spool {cfg.spool.path} is not on a volume"
        assert m.host_path(cfg.package) is not None, f"{name}: package {cfg.package} is not mounted"
        assert cfg.trusted_keys and not cfg.allow_unsigned, f"{name}: the agent trusts no key"
        for key in cfg.trusted_keys:
            assert m.host_path(key) is not None, f"{name}: trusted key {key} is not mounted"
        for s in cfg.sources:
            if s.uri.isdigit():
                assert f"/dev/video{s.uri}" in " ".join(service.get("devices", [])), f"{name}: camera {s.uri}"
            else:
                assert m.host_path(s.uri) is not None, f"{name}: source {s.uri} is not mounted"
        depends = service["depends_on"]
        assert depends["mosquitto"]["condition"] == "service_healthy"


def test_engine_cache_is_where_the_tensorrt_runtime_keeps_engines(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "agent" / "Dockerfile.jetson").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    source = (ROOT / "agent" / "runtimes" / "tensorrt.py").read_text()
    default = re.search(r'cache_dir or "([^"]+)"', source).group(1)
    m = mounts(compose["services"]["agent-jetson"])
    assert m.volume_of(str(PurePosixPath(workdir) / default)) == "engine-cache"
    assert compose["services"]["agent-jetson"]["runtime"] == "nvidia"


def test_dockerfiles_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT
            dockerfile = ROOT / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            for src in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile.read_text(), re.M):
                for part in src.split():
                    assert (ROOT / part).exists(), f"{dockerfile.name} copies {part}, which does not exist"
        for target, source in mounts(service).binds.items():
            if str(target).startswith("/run/secrets/"):
                continue
            rel = source.relative_to(ROOT)
            if rel.parts[0] in OPERATOR_FOLDERS:
                continue
            assert rel.parts[0] == "deploy" and source.exists(), f"{name}: mounts {rel}, which does not exist"


def test_secrets_are_all_made_by_the_deploy_scripts(compose: dict[str, Any]) -> None:
    scripts = (ROOT / "deploy" / "make-secrets.sh").read_text() + (ROOT / "deploy" / "add-device.sh").read_text()
    for name, spec in compose["secrets"].items():
        path = Path(spec["file"])
        assert path.parent == ROOT / "deploy" / "secrets", f"secret {name} lives outside deploy/secrets"
        assert f"/{path.name}" in scripts, f"no deploy script writes the secret file {path.name}"
    if shutil.which("git") and (ROOT / ".git").exists():
        files = [f"deploy/secrets/{Path(spec['file']).name}" for spec in compose["secrets"].values()]
        check = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
        assert check.stdout.split() == files, f"git must ignore the files in deploy/secrets: {check.stderr}"


def test_make_secrets_writes_private_files(tmp_path: Path, compose: dict[str, Any]) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns(
        "postgres_password", "pgpass", "*_mqtt_password", "s3_credentials", "seaweedfs_s3.json"))
    for _ in range(2):  # the second run keeps what the first made
        subprocess.run(["sh", str(tmp_path / "deploy" / "make-secrets.sh")], check=True, capture_output=True)
    folder = tmp_path / "deploy" / "secrets"
    for spec in compose["secrets"].values():
        path = folder / Path(spec["file"]).name
        assert path.exists() and path.stat().st_mode & 0o077 == 0, f"{path.name} must exist with mode 0600"
    password = (folder / "postgres_password").read_text()
    assert len(password) >= 24
    # the hub's object-store account is the one the seaweedfs service knows
    from hub.config import ImagesConfig

    s3 = ImagesConfig(backend="s3", credentials_file=str(folder / "s3_credentials")).credentials()
    identity = json.loads((folder / "seaweedfs_s3.json").read_text())["identities"][0]["credentials"][0]
    assert (identity["accessKey"], identity["secretKey"]) == (s3.access_key, s3.secret_key) and len(s3.secret_key) >= 24
    assert (folder / "pgpass").read_text() == f"postgres:5432:kdfleet:kdfleet:{password}\n"


def _conf(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def _listeners(text: str) -> dict[str, list[str]]:
    """The lines of each listener (by port) of a mosquitto.conf, comments and `protocol` left out."""
    out: dict[str, list[str]] = {}
    port = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("listener "):
            port = line.split()[1]
            out[port] = [line]
        elif port and line and not line.startswith("#") and not line.startswith("protocol "):
            if line.split()[0] in ("persistence", "log_dest", "connection"):
                port = None   # global settings from here on
                continue
            out[port].append(line)
    return out


def test_mosquitto_conf_matches_the_hub_files_and_volumes(compose: dict[str, Any]) -> None:
    from hub.config import load as load_hub
    from hub.mosquitto import TlsFiles, render_listener

    services = compose["services"]
    m = mounts(services["mosquitto"])
    conf_path = m.host_path(services["mosquitto"]["command"][-1])
    assert conf_path == ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
    text = conf_path.read_text()
    conf = _conf(text)
    assert conf["per_listener_settings"] == ["true"] and conf["persistence"] == ["true"]
    assert conf["max_queued_messages"] == ["0"], "the hub's session must keep its whole backlog (docs/hub.md)"
    assert m.volume_of(conf["persistence_location"][0]) == "mosquitto-data"
    # the stations' listener is published, the hub's is not; each is what hub/mosquitto.py renders
    published = [str(p["target"]) for p in services["mosquitto"]["ports"]]
    listeners = _listeners(text)
    assert published == ["8883"] and sorted(listeners) == ["8883", "8884"]
    tls = TlsFiles("/mosquitto/tls/ca.crt", "/mosquitto/tls/broker.crt", "/mosquitto/tls/broker.key")
    for port, role, passwd in (("8883", "devices", "passwd"), ("8884", "hub", "hub.passwd")):
        expected = render_listener(int(port), role=role, password_file=f"/mosquitto/auth/{passwd}",
                                   acl_file="/mosquitto/auth/acl", tls=tls).splitlines()
        assert listeners[port] == expected, f"listener {port} differs from what the hub renders"
    for path in (tls.cafile, tls.certfile, tls.keyfile):
        assert m.volume_of(path) == "broker-tls", path
    # the broker reads the files the hub writes, in the same volume under the same names
    hub_cfg = load_hub(ROOT / "deploy" / "hub" / "hub.toml")
    hub_mounts = mounts(services["hub-init"])
    for conf_key, path in (("password_file", hub_cfg.mqtt_auth.password_file),
                           ("password_file", hub_cfg.mqtt_auth.hub_passwords()),
                           ("acl_file", hub_cfg.mqtt_auth.acl_file)):
        broker_side = next(v for v in conf[conf_key] if PurePosixPath(v).name == PurePosixPath(path).name)
        assert m.volume_of(broker_side) == hub_mounts.volume_of(path) == "mosquitto-auth"
    make_certs = next(ns for n, _, c, ns in kdfleet_commands(compose) if n == "hub-init" and ns.command == "make-certs")
    assert hub_mounts.volume_of(make_certs.dir) == "broker-tls"
    assert services["mosquitto"]["depends_on"]["hub-init"]["condition"] == "service_completed_successfully"
    assert "docker-compose" in re.search(r"^APT_PACKAGES\s*:=(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_mosquitto_conf_runs_with_provisioned_credentials(tmp_path: Path) -> None:
    """The deploy config under a real Mosquitto, with certificates from `hub make-certs`: a
    provisioned device gets in over TLS on the stations' listener, the hub on its own, nobody
    else; the broker keeps its state on disk."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from hub import mosquitto
    from hub.services.devices import MqttAccount, mqtt_username
    from hub.tls import write_site_certs
    from tests.conftest import free_port, port_open

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    ports = {"8883": free_port(), "8884": free_port()}
    text = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    for folder in ("auth", "data", "tls"):
        text = text.replace(f"/mosquitto/{folder}", str(tmp_path / folder))
    for port, free in ports.items():
        text = re.sub(rf"^listener {port}$", f"listener {free} 127.0.0.1", text, flags=re.M)
    if os.geteuid() == 0:
        text += "user root\n"  # else it drops to the mosquitto user, who may not read tmp_path
    (tmp_path / "data").mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    write_site_certs(tmp_path / "tls", ["localhost"])
    password = mosquitto.new_password()
    account = MqttAccount("plant1", "cam-1", mqtt_username("plant1", "cam-1"), mosquitto.hash_password(password))
    auth = tmp_path / "auth"
    mosquitto.write_files(auth / "passwd", auth / "hub.passwd", auth / "acl", "kdfleet-hub", "hubpw", [account])

    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not all(port_open("127.0.0.1", p) for p in ports.values()):
            assert proc.poll() is None, f"mosquitto refused the deploy config:\n{proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "mosquitto did not listen within 10 s"
            time.sleep(0.05)

        def connect(listener: str, username: str | None, pw: str | None, tls: bool = True) -> Any:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{username}", protocol=paho.MQTTv5)
            if tls:
                client.tls_set(ca_certs=str(tmp_path / "tls" / "ca.crt"))
            if username:
                client.username_pw_set(username, pw)
            try:
                client.connect("localhost", ports[listener])
            except OSError:
                return False
            client.loop_start()
            time.sleep(0.3)
            ok = client.is_connected()
            client.loop_stop()
            client.disconnect()
            return ok

        assert connect("8883", account.username, password), "a provisioned device must get in"
        assert connect("8884", "kdfleet-hub", "hubpw"), "the hub's account must get in on its listener"
        assert not connect("8883", "kdfleet-hub", "hubpw"), "the hub's account is not a station's"
        assert not connect("8884", account.username, password), "a station may not sign in as the hub's processes"
        assert not connect("8883", None, None), "anonymous clients must be refused"
        assert not connect("8883", account.username, "wrong"), "a wrong password must be refused"
        assert not connect("8883", account.username, password, tls=False), "plain MQTT must be refused"
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "data" / "mosquitto.db").exists(), "persistence true: the broker saves its state on exit"
