"""Client ids bound to accounts, against a real Mosquitto with the listeners the hub's provisioning
is made for: a device that connects under the hub's id, or under another device's, neither knocks
its victim off nor wipes its session; what was queued for the victim is stored."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.config import load
from agent.pipeline import Agent
from hub.cli import main
from hub.db.models import Device, Result, Site
from hub.db.session import Database
from hub.ingest import Ingest
from hub.store import ImageStore
from shared import messages, topics
from shared.config import BrokerConfig
from tests.conftest import Mosquitto, free_port, provisioned_listeners
from tests.hub.conftest import _make_result as make_result
from tests.hub.test_provisioning import HUB_PASSWORD, HUB_USER, Client, _add_device
from tests.waiting import wait_for

QUEUED = 30


class ProvisionedSite:
    """Two provisioned devices and the broker the hub's files are written for."""

    def __init__(self, tmp_path: Path, db_url: str, site: str, private_broker, capsys) -> None:
        self.site = site
        auth = tmp_path / "mosquitto"
        config = tmp_path / "hub.toml"
        config.write_text(f'[mqtt_auth]\npassword_file = "{auth / "passwd"}"\nacl_file = "{auth / "acl"}"\n')
        common = ["--config", str(config), "--db", db_url,
                  "--broker", f"mqtt://{HUB_USER}:{HUB_PASSWORD}@127.0.0.1:1"]
        self.passwords = {d: _add_device([site, d, *common], capsys) for d in ("cam-1", "cam-2")}
        self.hub_port = free_port()
        self.broker: Mosquitto = private_broker(listeners=provisioned_listeners(auth, self.hub_port))

    def user(self, device: str) -> str:
        return f"{device}@{self.site}"

    def hub(self, db: Database, store: ImageStore, client_id: str) -> Ingest:
        ingest = Ingest(db, store, BrokerConfig(self.broker.host, self.hub_port, username=HUB_USER,
                                                password=HUB_PASSWORD),
                        client_id=client_id, site=self.site, shared_group="hub", flush_ms=20, persistent=True).start()
        assert ingest.wait_ready(10), "the hub's account must sign in on its own listener"
        return ingest


def takeover(port: int, client_id: str, username: str, password: str) -> Client:
    """Connect as `username` under `client_id` with a clean start (MQTT 5: session expiry 0)."""
    return Client(port, client_id, username, password)


def stored(db: Database, site: str) -> set[str]:
    with db.session() as session:
        return set(session.scalars(select(Result.id).join(Result.device).join(Device.site).where(Site.name == site)))


def test_a_device_under_the_hub_s_id_leaves_the_hub_s_session_alone(
    hub_db: Database, db_url: str, store: ImageStore, tmp_path: Path, private_broker, unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = ProvisionedSite(tmp_path, db_url, f"hubid-{unique}", private_broker, capsys)
    hub_id = f"kdfleet-hub-{unique}"
    s.hub(hub_db, store, hub_id).stop()   # away, its persistent session keeping what comes
    cam1 = Client(s.broker.port, "any-id", s.user("cam-1"), s.passwords["cam-1"])
    sent = [make_result(s.site, "cam-1", seed=i, crops=0) for i in range(QUEUED)]
    for r in sent:
        cam1.publish(topics.topic(s.site, "cam-1", topics.RESULT), messages.encode(r))
    clients = [cam1]
    try:
        # on the devices' listener the broker gives cam-2 its own user name as its id, whatever it asks
        intruder = takeover(s.broker.port, hub_id, s.user("cam-2"), s.passwords["cam-2"])
        clients.append(intruder)
        assert intruder.connected
        # on the hub's listener no device account signs in at all
        at_hub = takeover(s.hub_port, hub_id, s.user("cam-2"), s.passwords["cam-2"])
        clients.append(at_hub)
        assert not at_hub.connected and at_hub.refused in (5, 134, 135)
    finally:
        for c in clients:
            c.close()
    hub = s.hub(hub_db, store, hub_id)
    try:
        wait_for(lambda: stored(hub_db, s.site) == {r.id for r in sent}, 15, f"the {QUEUED} queued results")
    finally:
        hub.stop()


def test_a_device_under_another_device_s_id_does_not_knock_it_off(
    hub_db: Database, db_url: str, store: ImageStore, tmp_path: Path, private_broker, unique: str,
    plate_folder: Path, tiny_package: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.mqtt")
    s = ProvisionedSite(tmp_path, db_url, f"devid-{unique}", private_broker, capsys)
    hub = s.hub(hub_db, store, f"kdfleet-hub-{unique}")
    cfg = load(None, {"device": "cam-1", "site": s.site, "package": str(tiny_package), "runtime": "onnxruntime",
                      "broker": s.broker.url, "username": s.user("cam-1"), "password": s.passwords["cam-1"],
                      "threads": 1, "sources": [{"uri": str(plate_folder), "cls": "plate", "fps": 10.0}],
                      "spool": {"path": str(tmp_path / "spool.db")}, "allow_unsigned": True})
    victim = Agent(cfg)
    runner = threading.Thread(target=victim.run, kwargs={"until_drained": True})
    runner.start()
    clients: list[Client] = []
    try:
        assert victim.link.wait_connected(10)
        wait_for(lambda: len(stored(hub_db, s.site)) >= 2, 15, "the victim's first results")
        # the id the agent asks for, and the one the broker gives it: neither is cam-2's to take
        for client_id in (victim.link.client_id, s.user("cam-1")):
            intruder = takeover(s.broker.port, client_id, s.user("cam-2"), s.passwords["cam-2"])
            clients.append(intruder)
            assert intruder.connected
        runner.join(60)
        assert not runner.is_alive(), "the victim did not deliver all it made"
    finally:
        victim.stop.set()
        runner.join(30)
        for c in clients:
            c.close()
        hub.stop()
    lost = [r.getMessage() for r in caplog.records if "lost connection" in r.getMessage()]
    assert not lost, f"the victim was knocked off: {lost}"
    assert len(stored(hub_db, s.site)) == victim.counters.spooled == len(list(plate_folder.iterdir()))


def test_the_hub_refuses_client_ids_a_device_could_be_given(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    assert main(["ingest", "--db", db, "--client-id", "cam-1@plant1"]) == 2
    assert "ingest.client_id: 'cam-1@plant1' must have no '@'" in capsys.readouterr().err
