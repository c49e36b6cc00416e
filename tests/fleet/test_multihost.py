"""Two hub hosts on one PostgreSQL and one S3 bucket: `kdfleet hub serve` twice (each its own port and
data folder), ingest shared through the MQTT 5 shared subscription, an agent's real spool and
publisher sending results until the hub's receipts name them. One hub is killed (SIGKILL) mid-stream:
every result is stored once, with its images, the survivor takes over the leader lease (rollouts,
retention) and serves every page and every image, those the dead hub stored included.
"""
from __future__ import annotations

import hashlib
import http.cookiejar
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, text

from agent.publisher import Publisher
from agent.spool import Spool
from hub.db.session import Database, upgrade
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink
from tests.conftest import free_port, port_open
from tests.hub.conftest import _make_result
from tests.waiting import wait_for

PASSWORD = "two-hosts-secret"
RESULTS = 240
LEASE_S = 4.0


class Agent:
    """The agent's delivery (spool, publisher, receipts) without a camera: results are put in its spool."""

    def __init__(self, tmp_path: Path, broker: tuple[str, int], site: str, device: str) -> None:
        self.site, self.device = site, device
        self.spool = Spool(tmp_path / f"spool-{device}.db")
        self.stop = threading.Event()
        self.link = MqttLink(BrokerConfig(*broker), f"agent-{site}-{device}", on_message=self._on_message,
                             on_published=lambda mid: self.publisher.on_published(mid),
                             subscriptions=[(topics.topic(site, device, topics.RECEIPT), 1)])
        self.publisher = Publisher(self.spool, self.link, topics.topic(site, device, topics.RESULT), self.stop,
                                   window=32, resend_after_s=2.0, receipt_timeout_s=1.0, receipt_timeout_max_s=2.0)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.publisher.on_receipt(messages.decode(payload, expect=messages.Receipt))

    def start(self) -> Agent:
        self.link.start()
        self.publisher.start()
        return self

    def send(self, result: messages.Result) -> None:
        self.spool.put(messages.encode(result), result.verdict == "anomaly", result.id)
        self.publisher.notify()

    def close(self) -> None:
        self.stop.set()
        self.publisher.notify()
        self.publisher.join(5)
        self.link.stop()
        self.spool.close()


class Hub:
    """`python -m hub serve` with a config file of its own."""

    def __init__(self, tmp_path: Path, name: str, *, db: str, broker: tuple[str, int], site: str, group: str,
                 endpoint: str, bucket: str, credentials: Path) -> None:
        self.name, self.port = name, free_port()
        folder = tmp_path / name
        folder.mkdir()
        self.config = folder / "hub.toml"
        self.config.write_text(
            f'db = "{db}"\ndata_dir = "{folder}"\nbroker = "mqtt://{broker[0]}:{broker[1]}"\n'
            f"leader_lease_s = {LEASE_S}\n"
            f'[ingest]\nsite = "{site}"\nshared_group = "{group}"\nclient_id = "{name}"\nbatch_size = 50\n'
            f'[web]\nport = {self.port}\nrefresh_s = 0\n'
            f'[images]\nbackend = "s3"\nendpoint = "{endpoint}"\nbucket = "{bucket}"\n'
            f'credentials_file = "{credentials}"\ncreate_bucket = true\n'
            "[retention]\ninterval_min = 0\n")
        self.log_path = folder / "hub.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Hub:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open("127.0.0.1", self.port) or self.proc.poll() is not None, 60, f"{self.name} up")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def browser(self, user: str) -> Browser:
        return Browser(f"http://127.0.0.1:{self.port}", user)

    def stored(self, user: str) -> int:
        """Results this hub's ingest worker stored (its /metrics)."""
        try:
            _, _, body = self.browser(user).get("/metrics")
        except OSError:
            return 0
        found = re.search(rb"^kdfleet_ingest_stored_total (\d+)", body, re.M)
        return int(found.group(1)) if found else 0


class Browser:
    """Signs in over HTTP as a person would, then fetches pages."""

    def __init__(self, base: str, user: str) -> None:
        self.base = base
        self.web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        login = self.web.open(f"{base}/login").read().decode()
        token = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
        form = urllib.parse.urlencode({"csrf_token": token, "username": user, "password": PASSWORD,
                                       "next": "/"}).encode()
        self.web.open(f"{base}/login", data=form).read()

    def get(self, path: str) -> tuple[int, str, bytes]:
        response = self.web.open(self.base + path, timeout=30)
        return response.status, urllib.parse.urlparse(response.geturl()).path, response.read()


def _hub_cli(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "hub", *args], input=stdin, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_two_hub_hosts_share_the_work_and_the_survivor_carries_on(
        pg_url: str, seaweedfs, broker: tuple[str, int], unique: str, tmp_path: Path) -> None:
    site = f"multi-{unique}"
    db = Database(pg_url)
    upgrade(db)
    db.dispose()
    user = f"inspector-{unique}"
    _hub_cli("add-user", user, "--role", "viewer", "--db", pg_url, "--password-stdin", stdin=PASSWORD + "\n")
    common = {"db": pg_url, "broker": broker, "site": site, "group": f"g{unique}", "endpoint": seaweedfs.endpoint,
              "bucket": f"multi-{unique}", "credentials": seaweedfs.credentials_file(tmp_path / "creds")}
    hubs = [Hub(tmp_path, f"hub-a-{unique}", **common).start(), Hub(tmp_path, f"hub-b-{unique}", **common).start()]
    agents = [Agent(tmp_path, broker, site, f"cam-{i}").start() for i in range(2)]
    engine = create_engine(pg_url)

    def leader() -> str | None:
        with engine.connect() as c:
            return c.execute(text("SELECT holder FROM leases WHERE name = 'hub' AND expires_at > now()")).scalar()

    try:
        wait_for(lambda: leader() is not None, 20, "a leader among the two hubs")
        first = leader()
        assert sum(h.name in first for h in hubs) == 1, first
        time.sleep(2)  # both step rollouts every second: only one may lead
        assert [h.name in first for h in hubs] == ["took the 'hub' lease" in h.log() for h in hubs]
        sent: list[messages.Result] = []
        for i in range(RESULTS):
            r = _make_result(site, f"cam-{i % 2}", seed=1000 + i, crops=i % 3,
                             verdict=("ok", "anomaly")[i % 2 == 1])
            agents[i % 2].send(r)
            sent.append(r)
            if i == RESULTS // 3:   # both hubs have stored some by now: kill the leader mid-stream
                wait_for(lambda: all(h.stored(user) > 0 for h in hubs), 30, "results stored by both hubs")
                dead = next(h for h in hubs if h.name in first)
                dead.kill()
            time.sleep(0.02)
        survivor = next(h for h in hubs if h is not dead)

        def stored() -> int:
            with engine.connect() as c:
                return c.execute(text("SELECT COUNT(*) FROM results r JOIN devices d ON d.id = r.device_id "
                                      "JOIN sites s ON s.id = d.site_id WHERE s.name = :site"), {"site": site}).scalar()

        wait_for(lambda: stored() == RESULTS and all(a.spool.depth() == 0 for a in agents), 90,
                 f"{RESULTS} results stored and confirmed (stored {stored()}; survivor log: {survivor.log()[-600:]})")
        with engine.connect() as c:
            ids = c.execute(text("SELECT r.id FROM results r JOIN devices d ON d.id = r.device_id JOIN sites s "
                                 "ON s.id = d.site_id WHERE s.name = :site"), {"site": site}).scalars().all()
            shas = c.execute(text("SELECT heatmap_sha, thumbnail_sha FROM results WHERE id = ANY(:ids)"),
                             {"ids": ids}).all()
            crops = c.execute(text("SELECT image_sha FROM crops WHERE result_id = ANY(:ids)"), {"ids": ids}).scalars()
            crop_shas = list(crops)
        assert sorted(ids) == sorted(r.id for r in sent), "a result lost or stored twice"
        assert len(crop_shas) == sum(len(r.crops) for r in sent)

        # the lease: the survivor holds it once the dead hub's has run out
        wait_for(lambda: leader() is not None and survivor.name in leader(), LEASE_S * 3 + 5,
                 "the survivor taking the lease over")
        assert "took the 'hub' lease" in survivor.log()

        # every page works on the survivor, and every image is there, the dead hub's included
        browser = survivor.browser(user)
        pages = ["/", f"/results/?site={site}", f"/results/{sent[1].id}", f"/gallery/?site={site}", "/review/",
                 "/review/history", f"/charts/?site={site}", "/live/", "/models/", f"/devices/{site}/cam-1"]
        for page in pages:
            status, path, body = browser.get(page)
            assert status == 200 and path == urllib.parse.urlparse(page).path, f"{page}: {status} at {path}"
            if site in page:  # the unfiltered pages also show other tests' results, with images elsewhere
                assert b"image pruned" not in body, f"{page} shows a missing image"
        by_sha = {hashlib.sha256(d).hexdigest(): d
                  for r in sent for d in (r.heatmap, r.thumbnail, *(c.jpeg for c in r.crops))}
        for sha in {s for row in shas for s in row} | set(crop_shas):
            status, _, body = browser.get(f"/images/{sha}")
            assert status == 200 and body == by_sha[sha]
    finally:
        for a in agents:
            a.close()
        for h in hubs:
            h.stop()
        engine.dispose()
