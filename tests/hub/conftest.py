"""Hub fixtures: a migrated database (SQLite and PostgreSQL), an image store, message makers,
an MQTT publisher acting as an agent, and dashboard apps with signed-in clients of each role."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from flask import Flask
from flask.testing import FlaskClient
from paho.mqtt.enums import CallbackAPIVersion
from werkzeug.serving import make_server

from hub.db.session import Database, upgrade
from hub.services import users
from hub.store import ImageStore
from hub.web import create_app
from tests.waiting import wait_for as _wait_for
from shared import messages, topics
from shared.ids import new_ulid
from shared.imaging import encode_jpeg, encode_png

PASSWORD = "correct horse battery"  # every test user's password
ROLE_USERS = {"viewer": "vera", "operator": "otto", "admin": "ada"}


@pytest.fixture
def fresh_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of db_url's kind: a new SQLite file, or a new PostgreSQL database."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    from sqlalchemy import create_engine, text

    admin_url, name = db_url.rsplit("/", 1)[0] + "/postgres", f"kdfleet_fresh_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield db_url.rsplit("/", 1)[0] + f"/{name}"
    with engine.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(autouse=True)
def cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash test passwords with few rounds: scrypt's 0.1 s per hash adds up over a suite."""
    monkeypatch.setattr(users, "PASSWORD_METHOD", "pbkdf2:sha256:1000")


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at the newest revision, migrated once and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "hub.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    db.dispose()
    return path


@pytest.fixture
def hub_db(db_url: str, migrated_sqlite: Path) -> Iterator[Database]:
    """A database at the newest revision: a fresh SQLite file, or the session's PostgreSQL one."""
    if db_url.startswith("sqlite:///"):
        target = Path(db_url.removeprefix("sqlite:///"))
        if not target.exists():
            shutil.copyfile(migrated_sqlite, target)
    db = Database(db_url)
    upgrade(db)  # a no-op on the copy; migrates PostgreSQL on first use
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub data folder (image store, secret key) the tests share.

    Images are content-addressed, so tests storing the same image share one file; a test
    that deletes images uses a store of its own.
    """
    return tmp_path_factory.mktemp("hub-data")


@pytest.fixture
def store(data_dir: Path) -> ImageStore:
    return ImageStore(data_dir / "images")


def jpeg(seed: int, h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def heatmap_png(seed: int, h: int = 32, w: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, (h, w), dtype=np.uint8))


def _make_result(
    site: str,
    device: str,
    *,
    verdict: str = "anomaly",
    crops: int = 2,
    seed: int = 0,
    station: str = "st-1",
    cls: str = "bottle",
    **fields: object,
) -> messages.Result:
    """A realistic Result with a PNG heat map, a JPEG thumbnail and `crops` JPEG crops."""
    result = messages.Result(
        id=new_ulid(),
        ts=time.time(),
        site=site,
        device=device,
        station=station,
        cls=cls,
        model_version="1.4.0",
        score=0.8 + seed / 100,
        norm_score=1.6,
        threshold=0.5,
        verdict=verdict,
        latency_ms=23.5,
        heatmap=heatmap_png(seed),
        thumbnail=jpeg(seed),
        crops=tuple(
            messages.Crop(
                x=10 * i, y=5, w=16, h=12, score=2 - i / 10, jpeg=jpeg(seed * 100 + i, 12, 16)
            )
            for i in range(crops)
        ),
        source=f"frame-{seed:04d}.png",
    )
    return dataclasses.replace(result, **fields)


@pytest.fixture
def wait_for() -> Callable[..., None]:
    """`wait_for(predicate, timeout=10, what="...")`: poll until true, fail naming `what`."""
    return _wait_for


@pytest.fixture
def make_result() -> Callable[..., messages.Result]:
    """`make_result(site, device, verdict=..., crops=2, seed=0, **fields)`: a realistic Result."""
    return _make_result


class Publisher:
    """A plain paho client, as an agent would be; clears its retained messages afterwards."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect(host, port)
        self.client.loop_start()
        self.retained: set[str] = set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        if retain:
            self.retained.add(topic)

    def send(self, site: str, device: str, msg: object, retain: bool = False) -> None:
        self.publish(topics.topic(site, device, type(msg).TYPE), messages.encode(msg), retain)

    def close(self) -> None:
        for t in self.retained:
            self.publish(t, b"", retain=True)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_publisher() -> Iterator[Callable[..., Publisher]]:
    """`make_publisher(host, port, client_id, username=None, password=None)`, closed afterwards."""
    made: list[Publisher] = []

    def make(*args: object, **kwargs: object) -> Publisher:
        made.append(Publisher(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def publisher(
    broker: tuple[str, int], unique: str, make_publisher: Callable[..., Publisher]
) -> Publisher:
    return make_publisher(*broker, client_id=f"test-agent-{unique}")


# -- the dashboard -------------------------------------------------------------------


@pytest.fixture
def site(unique: str) -> str:
    return f"plant-{unique}"


@pytest.fixture
def seeded(hub_db: Database, store: ImageStore, site: str) -> dict[str, messages.Result]:
    """Two devices (cam-a online with metrics, cam-b offline) and five results of cam-a:
    results 1 and 3 are anomalies with two crops; stations st-1/st-2 alternate; result 4 is a
    screw, the rest bottles."""
    from hub.services.writes import BatchWriter, Envelope

    now = datetime.now(UTC)
    batch = [
        Envelope(
            site,
            "cam-a",
            messages.Status(
                device="cam-a",
                online=True,
                ts=time.time(),
                station="st-1",
                model_id="bottle-stfpm",
                model_version="1.4.0",
                runtime="tensorrt",
            ),
            now,
        ),
        Envelope(
            site,
            "cam-a",
            messages.Metrics(
                device="cam-a",
                ts=time.time(),
                fps=12.25,
                latency_p50_ms=30.0,
                latency_p95_ms=41.5,
                frames_dropped=0,
                spool_depth=4,
            ),
            now,
        ),
        Envelope(site, "cam-b", messages.Status(device="cam-b", online=False, ts=time.time()), now),
    ]
    results = [
        _make_result(
            site,
            "cam-a",
            seed=i,
            verdict="anomaly" if i in (1, 3) else "ok",
            crops=2 if i in (1, 3) else 0,
            station=f"st-{i % 2 + 1}",
            cls="screw" if i == 4 else "bottle",
        )
        for i in range(5)
    ]
    batch += [Envelope(site, "cam-a", r, now) for r in results]
    BatchWriter(hub_db, store).write(batch)
    return {r.id: r for r in results}


@pytest.fixture
def accounts(hub_db: Database, unique: str) -> Callable[[str], str]:
    """`accounts(role)`: the name of this test's user with that role (made on first use;
    password PASSWORD)."""
    made: dict[str, str] = {}

    def account(role: str) -> str:
        if role not in made:
            made[role] = f"{ROLE_USERS[role]}-{unique}"
            with hub_db.transaction() as session:
                users.create_user(session, made[role], PASSWORD, role)
        return made[role]

    return account


@pytest.fixture
def make_app(db_url: str, hub_db: Database, data_dir: Path) -> Iterator[Callable[..., Flask]]:
    """`make_app(**settings)`: a fresh app on this test's database, disposed afterwards."""
    apps: list[Flask] = []

    def make(**settings: object) -> Flask:
        app = create_app(
            {"TESTING": True, "HUB_DB_URL": db_url, "HUB_DATA_DIR": str(data_dir), **settings}
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["hub.db"].dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def login(client: FlaskClient, username: str, password: str = PASSWORD) -> str:
    """Sign `client` in through the login form; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").get_data(as_text=True))
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return csrf_of(client.get("/account").get_data(as_text=True))


@pytest.fixture
def sign_in(
    app: Flask, accounts: Callable[[str], str]
) -> Callable[[str], tuple[FlaskClient, str]]:
    """`sign_in(role)`: a new client signed in as that role's user, and its CSRF token."""

    def make(role: str) -> tuple[FlaskClient, str]:
        client = app.test_client()
        return client, login(client, accounts(role))

    return make


@pytest.fixture
def client(sign_in: Callable[[str], tuple[FlaskClient, str]]) -> FlaskClient:
    """A client signed in as an admin."""
    return sign_in("admin")[0]


@pytest.fixture
def live_hub(app: Flask) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """The hub app served over real HTTP by werkzeug in a thread; and the (path, Range) of each request."""
    seen: list[tuple[str, str | None]] = []
    inner = app.wsgi_app

    def recording(environ, start_response):  # type: ignore[no-untyped-def]
        seen.append((environ["PATH_INFO"], environ.get("HTTP_RANGE")))
        return inner(environ, start_response)

    app.wsgi_app = recording  # type: ignore[method-assign]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    thread.join(5)
