"""MQTT over TLS against a real Mosquitto TLS listener, with a CA made here (cryptography): the
link verifies the broker, shows a client certificate when asked, and says clearly what is wrong
with a plain client at a TLS port, a TLS client at a plain one, or a CA that did not sign the
broker's certificate. The agent and the hub run over TLS end to end; the dashboard serves HTTPS."""
from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from agent.config import load
from agent.pipeline import Agent
from hub.db.models import Result
from hub.db.session import Database
from hub.ingest import Ingest
from hub.mosquitto import TlsFiles, render_listener
from hub.store import ImageStore
from hub.tls import Pem, issue, make_ca
from shared.config import BrokerConfig, ConfigError
from shared.mqtt import MqttLink
from tests.agent.test_delivery import running
from tests.conftest import Mosquitto, free_port, port_open, provisioned_listeners
from tests.hub.test_provisioning import HUB_PASSWORD, HUB_USER, _add_device
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, pem: Pem) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.key").write_bytes(pem.key)
    (folder / f"{name}.crt").write_bytes(pem.cert)
    return folder / f"{name}.crt", folder / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, the broker's certificate for 127.0.0.1 and localhost, a client's, and a stranger CA."""
    folder = tmp_path / "pki"
    ca = make_ca("test CA")
    paths = {"ca": write(folder, "ca", ca)[0]}
    paths["broker_crt"], paths["broker_key"] = write(folder, "broker", issue(ca, "broker", ["127.0.0.1", "localhost"]))
    paths["client_crt"], paths["client_key"] = write(folder, "client", issue(ca, "station-7", client=True))
    paths["other_ca"] = write(folder, "other", make_ca("someone else's CA"))[0]
    return paths


def tls_broker(private_broker, pki: dict[str, Path], require_certificate: bool = False) -> Mosquitto:
    files = TlsFiles(str(pki["ca"]), str(pki["broker_crt"]), str(pki["broker_key"]), require_certificate)

    def listeners(port: int) -> str:
        return render_listener(port, role="hub", host="127.0.0.1", password_file="", acl_file="",
                               tls=files).replace("allow_anonymous false\npassword_file \nacl_file \n",
                                                  "allow_anonymous true\n")

    return private_broker(listeners=listeners, extra_conf="user root\n" if os.geteuid() == 0 else "")


def link(broker: Mosquitto, client_id: str, scheme: str = "mqtts", **tls: object) -> MqttLink:
    config = BrokerConfig.from_url(f"{scheme}://127.0.0.1:{broker.port}")
    return MqttLink(BrokerConfig(**{**config.__dict__, **tls}) if tls else config, client_id)


def exchange_over(broker: Mosquitto, unique: str, **tls: object) -> None:
    got: list[bytes] = []
    config = BrokerConfig(host="127.0.0.1", port=broker.port, tls=True, **tls)
    sub = MqttLink(config, f"sub-{unique}", subscriptions=[(f"kdtest/{unique}", 1)],
                   on_message=lambda t, p: got.append(p)).start()
    pub = MqttLink(config, f"pub-{unique}").start()
    try:
        assert sub.wait_connected(10) and sub.subscribed.wait(10) and pub.wait_connected(10), (sub.fatal, pub.fatal)
        pub.publish(f"kdtest/{unique}", b"over TLS")
        wait_for(lambda: got == [b"over TLS"], 10, "the message over TLS")
    finally:
        sub.stop()
        pub.stop()


def drained(agent: Agent, hub: Ingest) -> Agent:
    """Run `agent` on its folder until the hub has confirmed every result; then stop the hub."""
    try:
        assert hub.wait_ready(10)
        with running(agent) as runner:
            runner.join(60)
            assert not runner.is_alive(), "the hub's receipts did not empty the spool"
    finally:
        hub.stop()
    return agent


def test_the_link_verifies_the_broker_against_the_ca(pki, private_broker, unique):
    exchange_over(tls_broker(private_broker, pki), unique, ca_file=str(pki["ca"]))


def test_a_broker_that_asks_for_a_client_certificate_gets_ours(pki, private_broker, unique):
    broker = tls_broker(private_broker, pki, require_certificate=True)
    exchange_over(broker, unique, ca_file=str(pki["ca"]), cert_file=str(pki["client_crt"]),
                  key_file=str(pki["client_key"]))


@pytest.mark.parametrize("case, expected", [
    ("plain client, TLS listener", "speaks TLS: use mqtts://127.0.0.1:"),
    ("someone else's CA", "its TLS certificate is not trusted ("),
])
def test_a_wrong_tls_setting_is_a_clear_error_not_endless_retries(case, expected, pki, private_broker, unique):
    broker = tls_broker(private_broker, pki)
    if case.startswith("plain"):
        config = BrokerConfig(host="127.0.0.1", port=broker.port)
    else:
        config = BrokerConfig(host="127.0.0.1", port=broker.port, tls=True, ca_file=str(pki["other_ca"]))
    client = MqttLink(config, f"wrong-{unique}").start()
    try:
        wait_for(lambda: client.fatal is not None, 15, "the link to give up")
        assert expected in client.fatal and not client.connected.is_set()
    finally:
        client.stop()


def test_a_tls_client_at_a_plain_listener_is_told_so(private_broker, pki, unique):
    plain = private_broker()
    client = MqttLink(BrokerConfig(host="127.0.0.1", port=plain.port, tls=True, ca_file=str(pki["ca"])),
                      f"tls-{unique}").start()
    try:
        wait_for(lambda: client.fatal is not None, 15, "the link to give up")
        assert f"no TLS at port {plain.port}" in client.fatal and "use mqtt://" in client.fatal
    finally:
        client.stop()


def test_tls_files_that_do_not_load_are_refused_at_start(pki, tmp_path):
    with pytest.raises(ValueError, match=r"ca_file .*missing.crt does not exist"):
        MqttLink(BrokerConfig(tls=True, ca_file=str(tmp_path / "missing.crt")), "x")
    with pytest.raises(ValueError, match="are not a PEM certificate and its key"):
        MqttLink(BrokerConfig(tls=True, ca_file=str(pki["ca"]), cert_file=str(pki["client_crt"]),
                              key_file=str(pki["broker_key"])), "x")   # another certificate's key
    with pytest.raises(ConfigError, match="use mqtts://"):
        BrokerConfig(ca_file=str(pki["ca"])).checked()


def test_agent_and_hub_over_tls_with_provisioned_accounts(pki, hub_db: Database, db_url: str, store: ImageStore,
                                                          tmp_path: Path, private_broker, unique: str,
                                                          tiny_package: Path, plate_folder: Path, capsys):
    site = f"tls-{unique}"
    auth = tmp_path / "mosquitto"
    config = tmp_path / "hub.toml"
    config.write_text(f'[mqtt_auth]\npassword_file = "{auth / "passwd"}"\nacl_file = "{auth / "acl"}"\n')
    password = _add_device([site, "cam-1", "--config", str(config), "--db", db_url,
                            "--broker", f"mqtt://{HUB_USER}:{HUB_PASSWORD}@127.0.0.1:1"], capsys)
    hub_port = free_port()
    files = TlsFiles(str(pki["ca"]), str(pki["broker_crt"]), str(pki["broker_key"]))
    broker = private_broker(listeners=provisioned_listeners(auth, hub_port, tls=files))
    hub = Ingest(hub_db, store, BrokerConfig(host="localhost", port=hub_port, username=HUB_USER, password=HUB_PASSWORD,
                                             tls=True, ca_file=str(pki["ca"])),
                 client_id=f"hub-{unique}", site=site, flush_ms=20, persistent=False).start()
    cfg = load(None, {"device": "cam-1", "site": site, "package": str(tiny_package), "runtime": "onnxruntime",
                      "allow_unsigned": True, "threads": 1, "broker": f"mqtts://127.0.0.1:{broker.port}",
                      "ca_file": str(pki["ca"]),
                      "username": f"cam-1@{site}", "password": password,
                      "sources": [{"uri": str(plate_folder), "cls": "plate"}],
                      "spool": {"path": str(tmp_path / "spool.db")}})
    agent = drained(Agent(cfg), hub)
    assert agent.link.fatal is None
    with hub_db.session() as session:
        assert session.scalar(select(func.count()).select_from(Result)) >= agent.counters.spooled > 0


def test_the_dashboard_serves_https_with_secure_cookies(pki, tmp_path: Path, migrated_sqlite: Path):
    db = tmp_path / "hub.db"
    db.write_bytes(migrated_sqlite.read_bytes())
    port = free_port()
    config = tmp_path / "hub.toml"
    config.write_text(f'[web]\ncert_file = "{pki["broker_crt"]}"\nkey_file = "{pki["broker_key"]}"\n'
                      f'[retention]\ninterval_min = 0\n')
    proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--config", str(config), "--db", f"sqlite:///{db}",
                             "--data-dir", str(tmp_path / "hub"), "--port", str(port),
                             "--broker", f"mqtt://127.0.0.1:{free_port()}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the hub did not listen within 30 s"
            time.sleep(0.1)
        trusted = ssl.create_default_context(cafile=str(pki["ca"]))
        with urllib.request.urlopen(f"https://localhost:{port}/login", context=trusted, timeout=10) as page:
            assert page.status == 200
            cookies = page.headers.get_all("Set-Cookie") or []
        assert cookies and all("Secure" in c for c in cookies), cookies
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://localhost:{port}/login",
                                   context=ssl.create_default_context(cafile=str(pki["other_ca"])), timeout=10)
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()


def test_a_site_bridge_over_tls_with_its_own_account(pki, hub_db: Database, store: ImageStore, tmp_path: Path,
                                                     private_broker, unique: str, tiny_package: Path,
                                                     plate_folder: Path):
    """The recipe of docs/operations.md: the central broker has the hub's listener and one for
    bridges (TLS, their own accounts and ACL); the site's broker bridges to it with `bridge-config`."""
    from hub import mosquitto

    site, bridge_user, bridge_password = f"bridged-{unique}", f"bridge-{unique}", "bridge-secret-0123"
    auth = tmp_path / "central"
    mosquitto.write_files(auth / "passwd", auth / "hub.passwd", auth / "acl", HUB_USER, HUB_PASSWORD, [])
    mosquitto.write_atomically(auth / "bridges.passwd", f"{bridge_user}:{mosquitto.hash_password(bridge_password)}\n")
    mosquitto.write_atomically(auth / "bridges.acl", mosquitto.render_bridge_acl(bridge_user, site))
    hub_port = free_port()
    files = TlsFiles(str(pki["ca"]), str(pki["broker_crt"]), str(pki["broker_key"]))

    def central_listeners(port: int) -> str:
        return ("per_listener_settings true\n" + ("user root\n" if os.geteuid() == 0 else "")
                + render_listener(port, role="devices", host="127.0.0.1", password_file=auth / "bridges.passwd",
                                  acl_file=auth / "bridges.acl", tls=files)
                + render_listener(hub_port, role="hub", host="127.0.0.1", password_file=auth / "hub.passwd",
                                  acl_file=auth / "acl"))

    central = private_broker(listeners=central_listeners)
    bridge = subprocess.run(
        [sys.executable, "-m", "hub", "bridge-config", f"central-{unique}", f"127.0.0.1:{central.port}",
         "--site", site, "--username", bridge_user, "--password-stdin", "--cafile", str(pki["ca"])],
        input=bridge_password + "\n", capture_output=True, text=True, cwd=ROOT, check=True).stdout
    local = private_broker(extra_conf=bridge + ("user root\n" if os.geteuid() == 0 else ""))   # reads the CA
    hub = Ingest(hub_db, store, BrokerConfig(host="127.0.0.1", port=hub_port, username=HUB_USER,
                                             password=HUB_PASSWORD),
                 client_id=f"hub-{unique}", site=site, flush_ms=20, persistent=True).start()
    cfg = load(None, {"device": "cam-1", "site": site, "package": str(tiny_package), "runtime": "onnxruntime",
                      "allow_unsigned": True, "threads": 1, "broker": local.url,
                      "sources": [{"uri": str(plate_folder), "cls": "plate"}],
                      "spool": {"path": str(tmp_path / "spool.db")}})
    agent = drained(Agent(cfg), hub)
    with hub_db.session() as session:
        assert session.scalar(select(func.count()).select_from(Result)) >= agent.counters.spooled > 0
