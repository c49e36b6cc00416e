"""Every result made is stored exactly once, whatever the brokers do: a broker restarted with a
second subscriber on the results, or with an offline persistent session; two brokers bridged
(site -> central, the hub on the central one), each restarted mid-stream; the hub away a while.

A broker's PUBACK means only that the broker took a result. Mosquitto does not restore shared
subscriptions after a restart, so results published before the hub subscribes again go only to
the other subscriber (or to nobody, through a bridge) although the broker acknowledged them; only
the hub's receipts bring those results home. Real Mosquitto processes, the real agent and the
real ingest on SQLite.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from agent.config import load
from agent.pipeline import Agent
from hub.db.models import Device, Result, Site
from hub.db.session import Database
from hub.ingest import Ingest
from hub.mosquitto import render_bridge
from hub.store import ImageStore
from shared import topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink
from tests.conftest import Mosquitto
from tests.package_factory import plate
from tests.waiting import wait_for

FPS = 20.0
RECEIPTS = {"receipt_timeout_s": 1.0, "receipt_timeout_max_s": 2.0, "resend_after_s": 2.0}


@pytest.fixture
def db(migrated_sqlite: Path, tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database of this test's own (the bench covers PostgreSQL)."""
    shutil.copyfile(migrated_sqlite, tmp_path / "hub.db")
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    yield database
    database.dispose()


@pytest.fixture
def frames(tmp_path: Path) -> Callable[[int], Path]:
    def make(n: int) -> Path:
        folder = tmp_path / "frames"
        folder.mkdir()
        rng = np.random.default_rng(11)
        for i in range(n):
            cv2.imwrite(str(folder / f"{i:04d}.png"), plate(rng, i % 4 == 0))
        return folder

    return make


def persistent(broker_dir: Path, extra: str = "") -> str:
    """The production setting (deploy/mosquitto): sessions and queues kept across a restart.

    `user root` for a broker started as root: else it drops to the mosquitto user, who may not
    write the test's folder, and quietly keeps nothing."""
    broker_dir.mkdir(exist_ok=True)
    root = "user root\n" if os.geteuid() == 0 else ""
    return f"persistence true\npersistence_location {broker_dir}/\n{root}{extra}"


class Station:
    """The real agent on a paced folder, with the ids of every result it made."""

    def __init__(self, tmp_path: Path, package: Path, broker: Mosquitto, site: str, folder: Path) -> None:
        cfg = load(None, {"device": "cam-1", "site": site, "package": str(package), "broker": broker.url,
                          "runtime": "onnxruntime", "threads": 1, "allow_unsigned": True, "metrics_interval_s": 0.5,
                          "sources": [{"uri": str(folder), "cls": "plate", "fps": FPS}],
                          "spool": {"path": str(tmp_path / "spool.db")}, "delivery": RECEIPTS})
        self.agent = Agent(cfg)
        self.made: list[str] = []
        put = self.agent.spool.put

        def recording(payload: bytes, anomalous: bool, rid: str) -> int:
            self.made.append(rid)
            return put(payload, anomalous, rid)

        self.agent.spool.put = recording
        self.runner = threading.Thread(target=self.agent.run, kwargs={"until_drained": True})

    def start(self) -> Station:
        self.runner.start()
        return self

    def finish(self, timeout: float = 90.0) -> None:
        self.runner.join(timeout)
        if self.runner.is_alive():
            self.agent.stop.set()
            self.runner.join(30)
            raise AssertionError(f"the agent did not drain within {timeout} s: "
                                 f"{self.agent.publisher.unconfirmed()} results unconfirmed")


def start_hub(db: Database, store: ImageStore, broker: Mosquitto, site: str, client_id: str) -> Ingest:
    hub = Ingest(db, store, BrokerConfig(broker.host, broker.port), client_id=client_id, site=site,
                 shared_group="hub", flush_ms=30, persistent=True).start()
    assert hub.wait_ready(30), "the hub did not subscribe"
    return hub


def stored_ids(db: Database, site: str) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(Result.id).join(Result.device).join(Device.site).where(Site.name == site)))


def assert_each_stored_once(db: Database, site: str, station: Station) -> None:
    stored = stored_ids(db, site)
    made = station.made
    assert len(made) == len(set(made)) and len(made) == station.agent.counters.spooled
    missing = set(made) - set(stored)
    assert not missing, f"{len(missing)} of {len(made)} results made were never stored"
    assert len(stored) == len(set(stored)) == len(made)


def restart(broker: Mosquitto, down_s: float = 0.5) -> None:
    broker.stop()
    time.sleep(down_s)
    broker.start()


def acked_after(station: Station, n: int, timeout: float = 30.0) -> None:
    """Wait until the broker has acknowledged `n` more results (the hub still away)."""
    target = station.agent.publisher.acked + n
    wait_for(lambda: station.agent.publisher.acked >= target, timeout, f"{n} more PUBACKs")


@pytest.mark.parametrize("persistence", [True, False], ids=["persistence", "no-persistence"])
def test_broker_restarts_with_a_second_live_subscriber(tmp_path, tiny_package, frames, db, store, private_broker,
                                                       unique, persistence):
    site = f"second-{unique}"
    broker = private_broker(extra_conf=persistent(tmp_path / "broker") if persistence else "")
    hub_id = f"hub-{unique}"
    hub = start_hub(db, store, broker, site, hub_id)
    # a monitoring client, say, on the same results: it makes the broker acknowledge them
    monitor = MqttLink(BrokerConfig(broker.host, broker.port), f"monitor-{unique}",
                       subscriptions=[(topics.subscription(topics.RESULT, site=site), 1)]).start()
    station = Station(tmp_path, tiny_package, broker, site, frames(120)).start()
    try:
        wait_for(lambda: len(stored_ids(db, site)) >= 10, 30, "the first results stored")
        for _ in range(2):
            # the hub comes back after the station and the monitor: what the broker takes meanwhile
            # goes to the monitor only (the hub's shared subscription did not survive the restart)
            hub.stop()
            restart(broker)
            acked_after(station, 10)
            hub = start_hub(db, store, broker, site, hub_id)
        station.finish()
    finally:
        hub.stop()
        monitor.stop()
    assert_each_stored_once(db, site, station)
    assert station.agent.publisher.resent > 0, "the results the broker lost must have been sent again"


def test_broker_restart_with_an_offline_persistent_session(tmp_path, tiny_package, frames, db, store,
                                                           private_broker, unique):
    site = f"offline-{unique}"
    broker = private_broker(extra_conf=persistent(tmp_path / "broker"))
    # a client that subscribed to the results with a persistent session, then went away
    absent = MqttLink(BrokerConfig(broker.host, broker.port), f"absent-{unique}", clean_start=False,
                      subscriptions=[(topics.subscription(topics.RESULT, site=site), 1)]).start()
    assert absent.subscribed.wait(10)
    absent.stop()
    hub_id = f"hub-{unique}"
    hub = start_hub(db, store, broker, site, hub_id)
    station = Station(tmp_path, tiny_package, broker, site, frames(100)).start()
    try:
        wait_for(lambda: len(stored_ids(db, site)) >= 10, 30, "the first results stored")
        hub.stop()
        restart(broker)
        acked_after(station, 10)   # queued for the absent session only
        hub = start_hub(db, store, broker, site, hub_id)
        station.finish()
    finally:
        hub.stop()
    assert_each_stored_once(db, site, station)
    assert station.agent.publisher.resent > 0


def test_bridged_brokers_each_restarted_mid_stream(tmp_path, tiny_package, frames, db, store, private_broker,
                                                   unique):
    site = f"bridged-{unique}"
    central = private_broker(extra_conf=persistent(tmp_path / "central"))
    local = private_broker(extra_conf=persistent(tmp_path / "local", render_bridge(
        f"central-{unique}", f"{central.host}:{central.port}", site=site)))
    hub_id = f"hub-{unique}"
    hub = start_hub(db, store, central, site, hub_id)
    station = Station(tmp_path, tiny_package, local, site, frames(140)).start()
    try:
        wait_for(lambda: len(stored_ids(db, site)) >= 10, 30, "the first results across the bridge")
        restart(local)
        acked_after(station, 15)
        # the bridge comes back before the hub and forwards what the site broker acknowledged
        # long ago to a central broker where nobody subscribes yet
        hub.stop()
        restart(central)
        acked_after(station, 15)
        time.sleep(1.0)
        hub = start_hub(db, store, central, site, hub_id)
        station.finish()
    finally:
        hub.stop()
    assert_each_stored_once(db, site, station)


def test_hub_away_a_while_holds_the_backlog_on_the_station(tmp_path, tiny_package, frames, db, store,
                                                           private_broker, unique):
    site = f"away-{unique}"
    broker = private_broker(extra_conf=persistent(tmp_path / "broker"))
    hub_id = f"hub-{unique}"
    hub = start_hub(db, store, broker, site, hub_id)
    station = Station(tmp_path, tiny_package, broker, site, frames(100))
    station.agent.publisher.receipt_window = 10
    station.start()
    try:
        wait_for(lambda: len(stored_ids(db, site)) >= 5, 30, "the first results stored")
        hub.stop()
        time.sleep(3)
        agent = station.agent
        assert agent.publisher.unconfirmed() <= 10 < agent.spool.depth(), \
            "while the hub is away at most receipt_window results may wait in the broker"
        assert agent.metrics().pending_receipts == agent.publisher.unconfirmed()
        hub = start_hub(db, store, broker, site, hub_id)
        station.finish()
    finally:
        hub.stop()
    assert_each_stored_once(db, site, station)
