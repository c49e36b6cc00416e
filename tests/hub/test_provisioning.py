"""Device provisioning against a real Mosquitto: passwords it accepts, an ACL that keeps each
device to its own topics, the hub reading everything through its shared subscription."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from hub.cli import main
from hub.db.models import Device, Site
from hub.db.session import Database
from hub.ingest import Ingest
from hub.mosquitto import check_password, hash_password
from hub.store import ImageStore
from shared import messages, topics
from shared.config import BrokerConfig
from tests.conftest import free_port, provisioned_listeners

HUB_USER, HUB_PASSWORD = "kdfleet-hub", "hub-secret-0123456789"


def test_hashes_are_the_ones_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = Path("/usr/bin/mosquitto_passwd")
    if not tool.exists():
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    passwd = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", passwd, "alice", "s3cret pass"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$") and check_password("s3cret pass", theirs)
    assert not check_password("wrong", theirs)
    ours = hash_password("s3cret pass", salt=bytes(12), iterations=101)
    assert ours.split("$")[:4] == ["", "7", "101", "AAAAAAAAAAAAAAAA"]
    assert check_password("s3cret pass", ours)


class Client:
    """A device or an eavesdropper: paho with a user name, collecting what it receives."""

    def __init__(self, port: int, client_id: str, username: str | None, password: str | None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.refused: int | None = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.connected = False

        def on_connect(client, userdata, flags, reason, properties) -> None:
            self.connected = not reason.is_failure
            self.refused = reason.value if reason.is_failure else None

        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port)
        # wait for the CONNACK without a network thread: a refused client then has none to join
        deadline = time.monotonic() + 5
        while not self.connected and self.refused is None and time.monotonic() < deadline:
            self.client.loop(0.05)
        if self.connected:
            self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def subscribe_all(self, filters: list[str], timeout: float = 5.0) -> bool:
        """Subscribe in one SUBSCRIBE; True once the broker acknowledged it (granted or not)."""
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        return done.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        if self.connected:
            self.client.loop_stop()


def _metrics(device: str, fps: float) -> bytes:
    return messages.encode(
        messages.Metrics(
            device=device,
            ts=time.time(),
            fps=fps,
            latency_p50_ms=1.0,
            latency_p95_ms=2.0,
            frames_dropped=0,
            spool_depth=0,
        )
    )


def _add_device(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `add-device`; returns the password it printed once."""
    assert main(["add-device", *args]) == 0
    out = capsys.readouterr().out
    return re.search(r"shown only now:\n(\S+)\n", out).group(1)


def test_a_device_may_write_only_its_own_topics(
    hub_db: Database,
    db_url: str,
    store: ImageStore,
    tmp_path: Path,
    private_broker,
    unique: str,
    make_result,
    wait_for,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = f"acl-{unique}"
    auth = tmp_path / "mosquitto"
    passwd, acl = auth / "passwd", auth / "acl"
    config = tmp_path / "hub.toml"
    config.write_text(f'[mqtt_auth]\npassword_file = "{passwd}"\nacl_file = "{acl}"\n')
    common = ["--config", str(config), "--db", db_url, "--broker", f"mqtt://{HUB_USER}:{HUB_PASSWORD}@127.0.0.1:1"]

    assert main(["add-device", site, "cam-1", "--config", str(config), "--db", db_url]) == 1
    assert "names no user and password for the hub" in capsys.readouterr().err
    pw1 = _add_device([site, "cam-1", *common], capsys)
    pw2 = _add_device([site, "cam-2", *common], capsys)
    assert main(["add-device", site, "cam-1", *common]) == 1
    assert "has credentials already" in capsys.readouterr().err
    assert passwd.stat().st_mode & 0o007 == 0, "the password file must not be world-readable"
    assert (auth / "hub.passwd").stat().st_mode & 0o007 == 0
    assert pw1 not in passwd.read_text() and pw1 not in acl.read_text()
    # the devices' listeners know no hub account; the hub's knows nothing else
    assert HUB_USER not in passwd.read_text() and f"cam-1@{site}" not in (auth / "hub.passwd").read_text()
    with hub_db.session() as session:
        row = session.scalar(select(Device).join(Device.site).where(Device.name == "cam-1", Site.name == site))
        assert row.mqtt_username == f"cam-1@{site}" and check_password(pw1, row.mqtt_password_hash)

    hub_port = free_port()
    broker = private_broker(listeners=provisioned_listeners(auth, hub_port))

    hub = Ingest(
        hub_db,
        store,
        BrokerConfig(host=broker.host, port=hub_port, username=HUB_USER, password=HUB_PASSWORD),
        client_id=f"hub-{unique}",
        site=site,
        shared_group="hub",
        flush_ms=20,
        persistent=False,
    ).start()
    clients: list[Client] = []
    try:
        assert hub.wait_ready(10), "the hub's account must be able to subscribe"
        cam1 = Client(broker.port, f"c1-{unique}", f"cam-1@{site}", pw1)
        cam2 = Client(broker.port, f"c2-{unique}", f"cam-2@{site}", pw2)
        clients += [cam1, cam2]
        assert cam1.connected and cam2.connected

        # refused at the door: no password, a wrong one, another device's
        for username, password in ((None, None), (f"cam-1@{site}", "wrong"), (f"cam-1@{site}", pw2)):
            intruder = Client(broker.port, f"x-{unique}", username, password)
            clients.append(intruder)
            assert not intruder.connected and intruder.refused is not None

        # its own topics reach the hub
        own = make_result(site, "cam-1", crops=0)
        cam1.publish(topics.topic(site, "cam-1", topics.RESULT), messages.encode(own))
        cam1.publish(topics.topic(site, "cam-1", topics.METRICS), _metrics("cam-1", 9.0))
        wait_for(lambda: hub.stats().stored == 1 and hub.stats().updates == 1, what="cam-1's messages")

        # another device's topic does not, whatever the payload claims; cam-1's own message
        # sent after them arrives after anything the broker let through
        forged = make_result(site, "cam-2", crops=0)
        cam1.publish(topics.topic(site, "cam-2", topics.RESULT), messages.encode(forged))
        cam1.publish(topics.topic(site, "cam-2", topics.METRICS), _metrics("cam-2", 99.0))
        cam1.publish(topics.topic(site, "cam-2", topics.STATUS), b"", retain=True)
        cam1.publish(topics.topic(site, "cam-1", topics.METRICS), _metrics("cam-1", 8.0))
        wait_for(lambda: hub.stats().updates == 2, what="cam-1's second metrics")
        assert hub.stats().stored == 1 and hub.stats().received == 3

        # a device reads its own desired model, not another's (nor everyone's results)
        acked = cam1.subscribe_all(
            [
                topics.topic(site, "cam-2", topics.MODEL_DESIRED),
                topics.subscription(topics.RESULT),
                topics.topic(site, "cam-1", topics.MODEL_DESIRED),
            ]
        )
        assert acked, "the broker did not answer the subscriptions"
        desired = Client(hub_port, f"hubpub-{unique}", HUB_USER, HUB_PASSWORD)
        clients.append(desired)
        for device in ("cam-2", "cam-1"):  # cam-2's first: it would arrive before cam-1's
            desired.publish(topics.topic(site, device, topics.MODEL_DESIRED), device.encode())
        cam2.publish(topics.topic(site, "cam-2", topics.RESULT), messages.encode(make_result(site, "cam-2", crops=0)))
        wait_for(lambda: hub.stats().stored == 2, what="cam-2's own result")
        wait_for(lambda: len(cam1.got) >= 1, what="cam-1's desired model")
        assert cam1.got == [(topics.topic(site, "cam-1", topics.MODEL_DESIRED), b"cam-1")]

        # revoked: the broker refuses the device once it rereads its files (SIGHUP)
        assert main(["revoke-device", site, "cam-2", *common]) == 0
        assert f"cam-2@{site}" not in passwd.read_text() and f"cam-2@{site}" not in acl.read_text()
        os.kill(broker.proc.pid, signal.SIGHUP)

        def refused() -> bool:
            again = Client(broker.port, f"c2b-{unique}", f"cam-2@{site}", pw2)
            clients.append(again)
            return not again.connected

        wait_for(refused, what="the broker to refuse the revoked device")
    finally:
        for c in clients:
            c.close()
        hub.stop()
