"""GET /metrics against rows stored through the ingest's own writer, read back with a strict
parser of the Prometheus text format 0.0.4 written here."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hub.db.session import Database
from hub.ingest import Ingest
from hub.services.writes import BatchWriter, Envelope
from hub.services import users
from hub.store import ImageStore
from hub.web import create_app
from shared import messages, topics
from shared.config import BrokerConfig
from tests.hub.conftest import _make_result

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """The one sample of `name` whose labels include `labels`."""
        found = [v for (n, ls), v in self.samples.items() if n == name and set(labels.items()) <= ls]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and set(labels.items()) <= ls for n, ls in self.samples)


def parse(text: str) -> Exposition:
    """Parse the text format, refusing anything the format does not allow: a sample before its
    family's TYPE, a TYPE or HELP twice, bad names or labels, a repeated series, no final newline."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    out = Exposition()
    current = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {n}: {line!r}"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert NAME.fullmatch(name), where
                if parts[1] == "TYPE":
                    assert name not in out.types, f"TYPE repeated, {where}"
                    assert parts[3] in TYPES, where
                    assert not any(s == name for s, _ in out.samples), f"TYPE after samples, {where}"
                    out.types[name] = parts[3]
                    current = name
                else:
                    assert name not in out.helps, f"HELP repeated, {where}"
                    out.helps[name] = parts[3] if len(parts) > 3 else ""
            continue
        assert line.strip(), f"empty line inside the exposition, {where}"
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?", line)
        assert m, where
        name, body, value = m.group(1), m.group(2), m.group(3)
        assert name == current, f"a sample outside its family's block, {where}"
        labels: dict[str, str] = {}
        pos = 0
        while body and pos < len(body):
            lm = LABEL.match(body, pos)
            assert lm, f"bad label at {pos}, {where}"
            assert lm.group(1) not in labels, f"label repeated, {where}"
            labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), lm.group(2))
            pos = lm.end()
            if pos < len(body):
                assert body[pos] == ",", where
                pos += 1
        key = (name, frozenset(labels.items()))
        assert key not in out.samples, f"series repeated, {where}"
        assert re.fullmatch(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|Inf|NaN)", value), where
        out.samples[key] = float(value)
    for name in out.types:
        assert name in out.helps, f"{name} has no HELP"
    return out


@pytest.fixture
def app(hub_db: Database, db_url: str, tmp_path: Path) -> Iterator[Flask]:
    app = create_app({"HUB_DB_URL": db_url, "HUB_DATA_DIR": str(tmp_path / "hub"), "TESTING": True,
                      "HUB_SILENT_AFTER_S": 120})
    yield app
    app.extensions["hub.db"].dispose()


@pytest.fixture
def token(hub_db: Database, unique: str) -> str:
    with hub_db.transaction() as session:
        _, secret = users.create_token(session, f"prom-{unique}", "viewer")
    return secret


def _metrics(device: str, **fields: float) -> messages.Metrics:
    values = dict(fps=0.0, latency_p50_ms=0.0, latency_p95_ms=0.0, frames_dropped=0, spool_depth=0) | fields
    return messages.Metrics(device=device, ts=time.time(), **values)


def _status(site: str, device: str, online: bool) -> messages.Status:
    return messages.Status(device=device, online=online, ts=time.time(), site=site, station="st-1")


def test_metrics_report_the_rows_stored(hub_db: Database, store: ImageStore, app: Flask, token: str,
                                        unique: str) -> None:
    site = f"m-{unique}"
    now = datetime.now(UTC)
    old = now - timedelta(minutes=10)
    writer = BatchWriter(hub_db, store)

    def env(device: str, msg: object, at: datetime) -> Envelope:
        return Envelope(site, device, msg, at)

    # cam-1: two results stored ten minutes ago, then five captured 0.5 s before storage now
    older = [_make_result(site, "cam-1", crops=0, verdict="ok", ts=old.timestamp() - 1) for _ in range(2)]
    writer.write([env("cam-1", r, old) for r in older])
    fresh = [_make_result(site, "cam-1", crops=0, verdict="ok", ts=now.timestamp() - 0.5) for _ in range(5)]
    # cam-2: three captured 2 s before storage, then its last will
    lagging = [_make_result(site, "cam-2", crops=0, verdict="ok", ts=now.timestamp() - 2.0) for _ in range(3)]
    writer.write([env("cam-1", _status(site, "cam-1", True), now), env("cam-2", _status(site, "cam-2", True), now),
                  env("cam-3", _status(site, "cam-3", True), now)])
    writer.write([env("cam-1", r, now) for r in fresh] + [env("cam-2", r, now) for r in lagging])
    writer.write([
        env("cam-1", _metrics("cam-1", fps=9.5, latency_p50_ms=20.0, latency_p95_ms=40.0, spool_depth=3,
                              frames_dropped=7, cpu_percent=50.0), now),
        env("cam-2", _metrics("cam-2", fps=4.0, spool_depth=100), now),
        env("cam-3", _metrics("cam-3", fps=1.0, spool_depth=11, temperature_c=61.5), now),
        env("cam-2", _status(site, "cam-2", False), now),
    ])

    client: FlaskClient = app.test_client()
    response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.data
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse(response.get_data(as_text=True))

    for name in ("kdfleet_devices", "kdfleet_ingest_rate", "kdfleet_device_online", "kdfleet_device_fps"):
        assert m.types[name] == "gauge"
    # the database may hold other tests' devices (PostgreSQL is shared by the session): count ours
    ours = {ls: v for (n, ls), v in m.samples.items() if n == "kdfleet_device_state" and ("site", site) in ls}
    states = {dict(ls)["device"]: dict(ls)["state"] for ls, v in ours.items() if v == 1}
    assert states == {"cam-1": "online", "cam-2": "offline", "cam-3": "online"}
    assert m.value("kdfleet_devices", state="offline") >= 1 and m.value("kdfleet_devices", state="online") >= 2
    assert m.value("kdfleet_device_online", site=site, device="cam-2") == 0
    assert m.value("kdfleet_device_online", site=site, device="cam-1") == 1

    assert m.value("kdfleet_device_results_last_minute", site=site, device="cam-1") == 5
    assert m.value("kdfleet_device_results_last_minute", site=site, device="cam-2") == 3
    assert m.value("kdfleet_device_results_last_minute", site=site, device="cam-3") == 0
    assert not m.has("kdfleet_device_last_result_age_seconds", site=site, device="cam-3")
    assert m.value("kdfleet_device_last_result_age_seconds", site=site, device="cam-1") < 30
    assert m.value("kdfleet_device_last_result_lag_seconds", site=site, device="cam-1") == pytest.approx(0.5, abs=0.01)
    assert m.value("kdfleet_device_last_result_lag_seconds", site=site, device="cam-2") == pytest.approx(2.0, abs=0.01)

    total = m.value("kdfleet_results_last_minute")
    assert total >= 8
    assert m.value("kdfleet_ingest_rate") == pytest.approx(total / 60)
    assert m.value("kdfleet_ingest_lag_seconds", stat="max") >= 2.0 - 0.01
    if total == 8:  # only our rows in the window: the average is exactly theirs
        assert m.value("kdfleet_ingest_lag_seconds", stat="avg") == pytest.approx((5 * 0.5 + 3 * 2.0) / 8, abs=0.01)

    assert m.value("kdfleet_device_fps", site=site, device="cam-1") == 9.5
    assert m.value("kdfleet_device_latency_p50_seconds", site=site, device="cam-1") == pytest.approx(0.02)
    assert m.value("kdfleet_device_latency_p95_seconds", site=site, device="cam-1") == pytest.approx(0.04)
    assert m.value("kdfleet_device_spool_depth", site=site, device="cam-1") == 3
    assert m.value("kdfleet_device_frames_dropped", site=site, device="cam-1") == 7
    assert m.value("kdfleet_device_cpu_percent", site=site, device="cam-1") == 50
    assert not m.has("kdfleet_device_cpu_percent", site=site, device="cam-2"), "not reported: no sample"
    assert m.value("kdfleet_device_temperature_celsius", site=site, device="cam-3") == 61.5
    # the offline cam-2's 100 spooled results are not counted as waiting for the hub
    spool = {dict(ls)["device"]: v for (n, ls), v in m.samples.items()
             if n == "kdfleet_device_spool_depth" and ("site", site) in ls}
    assert spool == {"cam-1": 3, "cam-2": 100, "cam-3": 11}
    assert m.value("kdfleet_spool_depth_total") >= 14
    assert not m.has("kdfleet_ingest_queue_depth"), "no ingest in this process: no ingest counters"


def test_metrics_need_a_token_or_a_session(app: Flask, token: str, hub_db: Database, unique: str) -> None:
    client = app.test_client()
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["WWW-Authenticate"]
    assert b"add-token" in anonymous.data
    assert client.get("/metrics", headers={"Authorization": "Bearer kdf_not-a-token"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # a signed-in dashboard user may look too
    with hub_db.transaction() as session:
        users.create_user(session, "metrics-viewer", "correct horse battery", "viewer")
    from tests.hub.conftest import login

    login(client, "metrics-viewer")
    assert client.get("/metrics").status_code == 200
    # a revoked token no longer works
    with hub_db.transaction() as session:
        users.revoke_token(session, name=f"prom-{unique}")
    assert app.test_client().get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_metrics_include_an_in_process_ingest(app: Flask, token: str, hub_db: Database, store: ImageStore,
                                              unique: str) -> None:
    """With an ingest worker in the same process, its counters and queue are exposed too."""
    ingest = Ingest(hub_db, store, BrokerConfig(), client_id=f"m-{unique}")  # not started: nothing drains
    site = f"q-{unique}"
    ingest.handle(topics.topic(site, "cam-1", topics.RESULT), messages.encode(_make_result(site, "cam-1", crops=0)))
    ingest.handle(topics.topic(site, "cam-1", topics.RESULT), b"\x00not msgpack")
    app.extensions["hub.ingest"] = ingest
    m = parse(app.test_client().get("/metrics", headers={"Authorization": f"Bearer {token}"}).get_data(as_text=True))
    assert m.types["kdfleet_ingest_received_total"] == "counter"
    assert m.value("kdfleet_ingest_received_total") == 2
    assert m.value("kdfleet_ingest_malformed_total") == 1
    assert m.value("kdfleet_ingest_queue_depth") == 1


def test_parser_refuses_what_the_format_forbids() -> None:
    good = '# HELP a_b An a.\n# TYPE a_b gauge\na_b{x="1\\"q"} 2.5\na_b 3\n'
    assert parse(good).value("a_b", x='1"q') == 2.5
    for bad in ('a_b 1\n', '# HELP a_b x\n# TYPE a_b gauge\na_b{x="1",x="2"} 1\n',
                '# HELP a_b x\n# TYPE a_b gauge\na_b 1\na_b 2\n', '# HELP a_b x\n# TYPE a_b gauge\na_b one\n',
                '# HELP a_b x\n# TYPE a_b gauge\na_b 1'):
        with pytest.raises(AssertionError):
            parse(bad)
    assert math.isnan(parse("# HELP n x\n# TYPE n gauge\nn NaN\n").value("n"))
