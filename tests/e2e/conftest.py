"""A running hub for the browser: SQLite, real Mosquitto, ingest and the web server in this
process, and Chromium driven through Playwright (Debian's browser; never a downloaded one)."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.db.session import Database, upgrade
from hub.ingest import Ingest
from hub.services import users
from hub.store import ImageStore
from shared import messages, topics
from shared.config import BrokerConfig
from shared.ids import new_ulid
from shared.imaging import encode_jpeg, encode_png

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "correct horse battery"


@dataclass
class Hub:
    url: str
    site: str
    db: Database
    ingest: Ingest
    publish: Publisher
    users: dict[str, str]  # role -> user name


class Publisher:
    """An agent's MQTT connection."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.connect(host, port)
        self.client.loop_start()

    def send(self, site: str, msg: object) -> None:
        t = topics.topic(site, msg.device, type(msg).TYPE)  # type: ignore[attr-defined]
        self.client.publish(t, messages.encode(msg), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def result(site: str, device: str, seed: int, *, verdict: str, score: float, cls: str = "bottle",
           station: str = "line-1", ts: float | None = None) -> messages.Result:  # fmt: skip
    """A result with a frame-like thumbnail, a heat map and, for anomalies, two crops."""
    rng = np.random.default_rng(seed)
    frame = np.full((120, 160, 3), 90, np.uint8)
    frame[30:90, 40:120] = (40, 140, 200)  # the product
    heat = np.zeros((120, 160), np.float32)
    if verdict == "anomaly":
        y, x = rng.integers(35, 80), rng.integers(45, 110)
        frame[y : y + 8, x : x + 10] = (30, 30, 30)  # the defect
        heat[y + 4, x + 5] = 1.0
        heat = cv2.GaussianBlur(heat, (0, 0), 9)
        heat /= heat.max()
    heat = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)  # as agents draw them
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)  # shared.imaging speaks RGB
    crops = (
        tuple(
            messages.Crop(x=40 + 20 * i, y=40, w=24, h=18, score=2.0 - i / 4,
                          jpeg=encode_jpeg(frame[40:58, 40 + 20 * i : 64 + 20 * i]))
            for i in range(2)
        )
        if verdict == "anomaly"
        else ()
    )
    return messages.Result(
        id=new_ulid(), ts=ts or time.time(), site=site, device=device, station=station, cls=cls,
        model_version="1.4.0", score=score, norm_score=score / 0.5, threshold=0.5, verdict=verdict,
        latency_ms=21.0, heatmap=encode_png(heat), thumbnail=encode_jpeg(frame), crops=crops,
        source=f"frame-{seed:04d}.png",
    )  # fmt: skip


@pytest.fixture(scope="module")
def hub(broker: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The hub serving on a free port, ingesting one site's messages, with seeded results."""
    from werkzeug.serving import make_server

    from hub.web import create_app

    root = tmp_path_factory.mktemp("e2e-hub")
    url = f"sqlite:///{root / 'hub.db'}"
    db = Database(url)
    upgrade(db)
    unique = uuid.uuid4().hex[:8]
    site = f"e2e-{unique}"
    names = {role: f"{role}-{unique}" for role in ("viewer", "operator", "admin")}
    with db.transaction() as session:
        for role, name in names.items():
            users.create_user(session, name, PASSWORD, role)
    ingest = Ingest(
        db,
        ImageStore(root / "images"),
        BrokerConfig(host=broker[0], port=broker[1]),
        client_id=f"e2e-hub-{unique}",
        site=site,
        shared_group=f"e2e{unique}",
        flush_ms=50,
        persistent=False,
    ).start()
    assert ingest.wait_ready(10), "ingest did not subscribe"
    app = create_app({"HUB_DB_URL": url, "HUB_DATA_DIR": str(root), "HUB_LIVE_POLL_S": 0.2, "HUB_REFRESH_S": 0})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    publisher = Publisher(*broker, client_id=f"e2e-agent-{unique}")

    # the fleet: one station device online with metrics, one offline; results of the last hours
    publisher.send(site, messages.Status(device="cam-1", online=True, ts=time.time(), site=site, station="line-1",
                                         version="0.9.1", model_id="bottle-stfpm", model_version="1.4.0",
                                         runtime="onnxruntime", hardware="x86_64"))  # fmt: skip
    publisher.send(site, messages.Metrics(device="cam-1", ts=time.time(), fps=14.5, latency_p50_ms=22.0,
                                          latency_p95_ms=31.0, frames_dropped=0, spool_depth=0))  # fmt: skip
    publisher.send(site, messages.Status(device="cam-2", online=False, ts=time.time()))
    now = time.time()
    seeded = 0
    for i in range(30):  # yesterday, the drift reference: lower scores
        publisher.send(site, dataclasses.replace(
            result(site, "cam-1", 500 + i, verdict="ok", score=0.12 + (i % 9) / 50,
                   station="line-1", cls="bottle" if i % 3 else "cap"),
            ts=now - 86400 - 3600 * 5 + i * 500))  # fmt: skip
        seeded += 1
    for i in range(36):
        anomalous = i % 6 == 0
        publisher.send(site, dataclasses.replace(
            result(site, "cam-1" if i % 2 else "cam-2", i, verdict="anomaly" if anomalous else "ok",
                   score=0.62 + i / 200 if anomalous else 0.2 + (i % 7) / 40,
                   station="line-1" if i % 2 else "line-2", cls="bottle" if i % 3 else "cap"),
            ts=now - 3600 * 5 + i * 500))  # fmt: skip
        seeded += 1
    deadline = time.monotonic() + 15
    while ingest.stats().stored < seeded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ingest.stats().stored == seeded, ingest.stats()
    yield Hub(f"http://127.0.0.1:{server.server_port}", site, db, ingest, publisher, names)
    publisher.close()
    server.shutdown()
    thread.join(5)
    ingest.stop()
    app.extensions["hub.db"].dispose()
    db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium): the browser tests need it")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, hub: Hub) -> Iterator[object]:
    """A fresh browser tab (own cookies) that fails the test on a script error, a refused
    Content-Security-Policy, or a failed request (other than a wrong password's 401)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    problems: list[str] = []

    def console(message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)  # script errors, CSP refusals

    def response(r) -> None:
        wrong_password = r.status == 401 and r.request.method == "POST" and r.url.endswith("/login")
        if r.status >= 400 and not wrong_password:
            problems.append(f"{r.request.method} {r.url}: {r.status}")

    tab.on("console", console)
    tab.on("response", response)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    yield tab
    context.close()
    assert not problems, f"the browser reported errors: {problems}"


def sign_in(page, hub: Hub, role: str, path: str = "/") -> None:
    """Open `path`, get sent to the login form, sign in and land back on `path`."""
    page.goto(hub.url + path)
    assert "/login" in page.url
    page.get_by_label("User name").fill(hub.users[role])
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(hub.url + path)
