"""Ingest against the real broker and databases: results, duplicates, bad payloads, devices,
shared subscriptions, and acknowledgement after commit (a crashed hub loses nothing)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from sqlalchemy import func, select

from hub.db.models import Crop, Device, ProductClass, Result, Site, Station
from hub.db.session import Database
from hub.ingest import Ingest
from hub.store import ImageStore
from shared import messages, topics
from shared.config import BrokerConfig
from shared.imaging import decode_image


@pytest.fixture
def site(unique: str) -> str:
    return f"site-{unique}"


@pytest.fixture
def ingest(
    hub_db: Database,
    store: ImageStore,
    broker: tuple[str, int],
    unique: str,
    site: str,
    publisher,
    wait_for: Callable[..., None],
) -> Iterator[Ingest]:
    """A running ingest for this test's site only, with its subscriptions confirmed active."""
    worker = Ingest(
        hub_db,
        store,
        BrokerConfig(host=broker[0], port=broker[1]),
        client_id=f"test-hub-{unique}",
        site=site,
        shared_group=f"g{unique}",
        batch_size=50,
        flush_ms=30,
        persistent=False,
    ).start()
    assert worker.wait_ready(10), "ingest did not connect and subscribe"
    yield worker
    worker.stop()


def count(db: Database, stmt) -> int:
    with db.session() as session:
        return session.scalar(stmt)


def results_of(db: Database, site: str) -> list[Result]:
    with db.session() as session:
        return list(
            session.scalars(
                select(Result)
                .join(Result.device)
                .join(Device.site)
                .where(Site.name == site)
                .order_by(Result.id)
            )
        )


def device_row(db: Database, site: str, name: str) -> Device | None:
    with db.session() as session:
        return session.scalar(
            select(Device).join(Device.site).where(Site.name == site, Device.name == name)
        )


def test_results_are_stored_with_their_images_and_crops(
    ingest: Ingest,
    publisher,
    hub_db: Database,
    store: ImageStore,
    site: str,
    make_result,
    wait_for,
) -> None:
    sent = [
        make_result(site, "cam-1", seed=i, crops=i % 3, verdict=("ok", "anomaly")[i % 2])
        for i in range(6)
    ]
    for r in sent:
        publisher.send(site, "cam-1", r)
    wait_for(lambda: ingest.stats().stored == 6, what="6 stored results")

    rows = results_of(hub_db, site)
    assert [r.id for r in rows] == sorted(r.id for r in sent)
    by_id = {r.id: r for r in sent}
    with hub_db.session() as session:
        stations = dict(session.execute(select(Station.id, Station.name)).all())
        classes = dict(session.execute(select(ProductClass.id, ProductClass.name)).all())
    for row in rows:
        msg = by_id[row.id]
        assert (stations[row.station_id], classes[row.class_id], row.model_version, row.verdict) == (
            msg.station,
            msg.cls,
            msg.model_version,
            msg.verdict,
        )
        assert row.score == pytest.approx(msg.score) and row.threshold == pytest.approx(
            msg.threshold
        )
        assert row.ts.timestamp() == pytest.approx(msg.ts, abs=1e-3)
        assert store.get(row.heatmap_sha).data == msg.heatmap
        assert store.get(row.thumbnail_sha).media_type == "image/jpeg"
        assert decode_image(store.get(row.thumbnail_sha).data).shape == (48, 64, 3)
        assert row.frame_sha is None  # no full frame sent
    with hub_db.session() as session:
        crops = session.execute(
            select(Crop.result_id, Crop.idx, Crop.image_sha).order_by(Crop.result_id, Crop.idx)
        )
        crops = [c for c in crops if c.result_id in by_id]
    assert len(crops) == sum(len(r.crops) for r in sent)
    for c in crops:
        assert store.get(c.image_sha).data == by_id[c.result_id].crops[c.idx].jpeg


def test_a_result_sent_again_is_stored_once(
    ingest: Ingest, publisher, hub_db: Database, site: str, make_result, wait_for
) -> None:
    r = make_result(site, "cam-1", crops=2)
    for _ in range(3):  # same batch
        publisher.send(site, "cam-1", r)
    wait_for(
        lambda: ingest.stats().stored + ingest.stats().duplicates == 3, what="3 results handled"
    )
    publisher.send(site, "cam-1", r)  # a later batch, as after an agent's spool replay
    wait_for(lambda: ingest.stats().duplicates == 3, what="3 duplicates")

    assert ingest.stats().stored == 1
    assert [row.id for row in results_of(hub_db, site)] == [r.id]
    assert count(hub_db, select(func.count()).select_from(Crop).where(Crop.result_id == r.id)) == 2


def test_malformed_payloads_are_counted_not_stored_and_ingest_goes_on(
    ingest: Ingest,
    publisher,
    hub_db: Database,
    site: str,
    make_result,
    wait_for,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.ingest")
    result_topic = topics.topic(site, "cam-1", topics.RESULT)
    good = make_result(site, "cam-1")
    bad = [
        b"\xc1 not msgpack " + b"x" * 20_000,  # garbage, long
        msgpack.packb({"v": 99, "t": "result"}),  # unknown schema version
        messages.encode(
            messages.Status(device="cam-1", online=True, ts=time.time())
        ),  # wrong type for topic
        messages.encode(make_result(site, "someone-else")),  # names another device
        messages.encode(
            make_result(site, "cam-1", heatmap=b"<script>alert(1)</script>")
        ),  # not an image
        messages.encode(make_result(site, "cam-1", verdict="ok"))[:-7],  # truncated
        # an id PostgreSQL would cut to its 26-character column, where it could collide
        messages.encode(make_result(site, "cam-1", id=good.id + "X" * 174)),
        messages.encode(make_result(site, "cam-1", station="line\x00a")),  # text PostgreSQL refuses
    ]
    for payload in bad:
        publisher.publish(result_topic, payload)
    publisher.send(site, "cam-1", good)

    wait_for(lambda: ingest.stats().stored == 1, what="the good result after the bad ones")
    stats = ingest.stats()
    assert stats.malformed == len(bad)
    assert stats.failed == 0
    assert [row.id for row in results_of(hub_db, site)] == [good.id]
    assert device_row(hub_db, site, "someone-else") is None
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert warnings, "malformed payloads must be logged"
    assert all(len(w) < 1000 for w in warnings), "payloads in logs must be cut short"


def test_status_and_metrics_keep_the_device_row_current(
    ingest: Ingest, publisher, hub_db: Database, site: str, wait_for
) -> None:
    birth = messages.Status(
        device="cam-2",
        online=True,
        ts=time.time(),
        site=site,
        station="line-3",
        version="0.9.1",
        model_id="bottle-stfpm",
        model_version="1.4.0",
        runtime="onnxruntime",
        hardware="x86_64",
    )
    publisher.send(site, "cam-2", birth, retain=True)
    publisher.send(
        site,
        "cam-2",
        messages.Metrics(
            device="cam-2",
            ts=time.time(),
            fps=14.5,
            latency_p50_ms=31.0,
            latency_p95_ms=48.2,
            frames_dropped=3,
            spool_depth=7,
            infer_p50_ms=2.5,
            infer_p95_ms=3.1,
            score_p95_ms=0.9,
            gpu_percent=41.0,
            frames_rejected=5,
            source_error="/data/cam-2: not a folder",
        ),
    )
    wait_for(
        lambda: (d := device_row(hub_db, site, "cam-2")) is not None and d.fps is not None,
        what="the device row with metrics",
    )

    d = device_row(hub_db, site, "cam-2")
    assert d.online and d.runtime == "onnxruntime"
    with hub_db.session() as session:
        assert session.get(Station, d.station_id).name == "line-3"
    assert (d.model_id, d.model_version, d.agent_version) == ("bottle-stfpm", "1.4.0", "0.9.1")
    assert (d.fps, d.latency_p95_ms, d.spool_depth, d.frames_dropped) == (14.5, 48.2, 7, 3)
    assert (d.infer_p95_ms, d.score_p95_ms, d.gpu_percent) == (3.1, 0.9, 41.0)
    assert (d.frames_rejected, d.source_error) == (5, "/data/cam-2: not a folder")
    assert d.cpu_percent is None and d.temperature_c is None  # not reported
    assert d.last_seen is not None and abs(time.time() - d.last_seen.timestamp()) < 30

    publisher.send(
        site, "cam-2", messages.Status(device="cam-2", online=False, ts=time.time()), retain=True
    )
    wait_for(lambda: not device_row(hub_db, site, "cam-2").online, what="the device to go offline")
    # an offline status (a last will) carries nothing else: the model stays known
    assert device_row(hub_db, site, "cam-2").model_version == "1.4.0"


AGENT = textwrap.dedent("""
    import sys, time
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from shared import messages, topics
    host, port, site, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    t = topics.topic(site, device, topics.STATUS)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="agent-" + site, protocol=paho.MQTTv5)
    will = messages.Status(device=device, online=False, ts=time.time())
    c.will_set(t, messages.encode(will), qos=1, retain=True)
    c.connect(host, port, keepalive=5)
    c.loop_start()
    birth = messages.Status(device=device, online=True, ts=time.time(), model_version="2.0")
    c.publish(t, messages.encode(birth), qos=1, retain=True).wait_for_publish(5)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_device_that_dies_goes_offline_through_its_last_will(
    ingest: Ingest,
    publisher,
    hub_db: Database,
    broker: tuple[str, int],
    site: str,
    wait_for,
) -> None:
    publisher.retained.add(topics.topic(site, "cam-3", topics.STATUS))  # clear the will afterwards
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, broker[0], str(broker[1]), site, "cam-3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout.readline().strip() == "ready"
        wait_for(
            lambda: (d := device_row(hub_db, site, "cam-3")) is not None and d.online,
            what="the device's birth message",
        )
        assert device_row(hub_db, site, "cam-3").model_version == "2.0"
        agent.kill()  # no DISCONNECT: the broker must publish the will
        agent.wait(5)
        wait_for(
            lambda: not device_row(hub_db, site, "cam-3").online,
            what="the last will to mark it offline",
        )
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        agent.stdout.close()


def test_stop_stores_what_was_received(
    hub_db: Database,
    store: ImageStore,
    broker: tuple[str, int],
    unique: str,
    site: str,
    publisher,
    make_result,
    wait_for,
) -> None:
    # a long flush interval: only stop() can have written these
    worker = Ingest(
        hub_db,
        store,
        BrokerConfig(host=broker[0], port=broker[1]),
        client_id=f"test-hub2-{unique}",
        site=site,
        shared_group=None,
        batch_size=1000,
        flush_ms=60_000,
        linger_ms=60_000,
        persistent=False,
    ).start()
    try:
        assert worker.wait_ready(10)
        before = worker.stats().received
        for i in range(5):
            publisher.send(site, "cam-4", make_result(site, "cam-4", seed=i, crops=0))
        wait_for(lambda: worker.stats().received == before + 5, what="5 results received")
        assert results_of(hub_db, site) == []
    finally:
        worker.stop()
    assert len(results_of(hub_db, site)) == 5
    assert worker.stats().stored == 5


def test_workers_in_one_shared_group_split_the_results(
    hub_db: Database,
    store: ImageStore,
    broker: tuple[str, int],
    unique: str,
    site: str,
    publisher,
    ingest: Ingest,
    make_result,
    wait_for,
) -> None:
    second = Ingest(
        hub_db,
        store,
        BrokerConfig(host=broker[0], port=broker[1]),
        client_id=f"test-hub-b-{unique}",
        site=site,
        shared_group=f"g{unique}",
        flush_ms=30,
        persistent=False,
    ).start()
    try:
        assert second.wait_ready(10)
        sent = [make_result(site, "cam-5", seed=i, crops=0) for i in range(20)]
        for r in sent:
            publisher.send(site, "cam-5", r)
        wait_for(
            lambda: ingest.stats().stored + second.stats().stored == 20, what="20 results stored"
        )
        assert ingest.stats().stored > 0 and second.stats().stored > 0
        assert ingest.stats().duplicates == second.stats().duplicates == 0
    finally:
        second.stop()
    assert len(results_of(hub_db, site)) == 20


def test_a_database_outage_is_waited_out(
    ingest: Ingest, hub_db: Database, site: str, make_result, wait_for, monkeypatch
) -> None:
    from sqlalchemy.exc import OperationalError

    real_write, calls = ingest.writer.write, []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) <= 2:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real_write(batch)

    monkeypatch.setattr(ingest.writer, "write", flaky)
    r = make_result(site, "cam-6")
    ingest.handle(topics.topic(site, "cam-6", topics.RESULT), messages.encode(r))
    wait_for(lambda: ingest.stats().stored == 1, what="the result after the outage")
    assert len(calls) == 3 and ingest.stats().failed == 0
    assert [row.id for row in results_of(hub_db, site)] == [r.id]


def refuse_in_writes(ingest: Ingest, poison: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database refuses every batch that holds result `poison` (a value too long, say)."""
    from sqlalchemy.exc import IntegrityError

    real_write = ingest.writer.write

    def picky(batch):
        if any(getattr(e.message, "id", None) == poison for e in batch):
            raise IntegrityError("INSERT", {}, Exception("value too long"))
        return real_write(batch)

    monkeypatch.setattr(ingest.writer, "write", picky)


def test_a_message_the_database_refuses_does_not_sink_its_batch(
    ingest: Ingest, hub_db: Database, site: str, make_result, wait_for, monkeypatch, caplog
) -> None:
    sent = [make_result(site, "cam-7", seed=i) for i in range(4)]
    poison = sent[2].id
    refuse_in_writes(ingest, poison, monkeypatch)
    for r in sent:
        ingest.handle(topics.topic(site, "cam-7", topics.RESULT), messages.encode(r))
    wait_for(lambda: ingest.stats().stored + ingest.stats().failed == 4, what="4 results handled")
    assert ingest.stats().failed == 1
    assert {row.id for row in results_of(hub_db, site)} == {r.id for r in sent} - {poison}
    assert any(poison in rec.getMessage() for rec in caplog.records)


CRASHING_HUB = textwrap.dedent("""
    import sys, time
    from hub.db.session import Database
    from hub.ingest import Ingest
    from hub.store import ImageStore
    from shared.config import BrokerConfig
    db_url, images, host, port, client_id, site, expect = sys.argv[1:8]
    worker = Ingest(Database(db_url), ImageStore(images), BrokerConfig(host=host, port=int(port)),
                    client_id=client_id, site=site, shared_group="crash", batch_size=1000,
                    flush_ms=60_000, linger_ms=60_000, persistent=True)
    worker.start()
    assert worker.wait_ready(10), "no subscription"
    print("ready", flush=True)
    while worker.stats().received < int(expect):
        time.sleep(0.01)
    print("received", flush=True)
    time.sleep(60)
""")


def test_a_hub_that_crashes_before_its_commit_loses_nothing(
    hub_db: Database,
    store: ImageStore,
    db_url: str,
    private_broker,
    unique: str,
    make_publisher,
    make_result,
    wait_for,
) -> None:
    b = private_broker()
    site = f"crash-{unique}"
    client_id = f"hub-{unique}"
    hub = subprocess.Popen(
        [sys.executable, "-c", CRASHING_HUB, db_url, str(store.root), b.host, str(b.port),
         client_id, site, "8"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    sent = [make_result(site, "cam-9", seed=i, crops=1) for i in range(8)]
    try:
        assert hub.stdout.readline().strip() == "ready"
        agent = make_publisher(b.host, b.port, f"agent-{unique}")
        for r in sent:
            agent.send(site, "cam-9", r)
        assert hub.stdout.readline().strip() == "received"
    finally:
        hub.kill()  # SIGKILL: nothing written, nothing acknowledged
        hub.wait(5)
        hub.stdout.close()
    assert results_of(hub_db, site) == []

    restarted = Ingest(
        hub_db,
        store,
        BrokerConfig(host=b.host, port=b.port),
        client_id=client_id,
        site=site,
        shared_group="crash",
        flush_ms=30,
        persistent=True,
    ).start()
    try:
        wait_for(lambda: restarted.stats().stored == 8, what="the broker to deliver all 8 again")
    finally:
        restarted.stop()
    assert {r.id for r in results_of(hub_db, site)} == {r.id for r in sent}


class Receipts:
    """Listens, as a device does, for the receipts the hub sends one device."""

    def __init__(self, broker: tuple[str, int], site: str, device: str, client_id: str) -> None:
        from shared.mqtt import MqttLink

        self.got: list[messages.Receipt] = []
        self.link = MqttLink(
            BrokerConfig(*broker),
            client_id,
            subscriptions=[(topics.topic(site, device, topics.RECEIPT), 1)],
            on_message=lambda t, p: self.got.append(messages.decode(p, expect=messages.Receipt)),
        ).start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def ids(self) -> list[str]:
        return [i for r in self.got for i in r.ids]

    def refused(self) -> list[str]:
        return [i for r in self.got for i in r.refused]


@pytest.fixture
def receipts(broker: tuple[str, int], site: str, unique: str) -> Iterator[Receipts]:
    listener = Receipts(broker, site, "cam-1", f"receipts-{unique}")
    yield listener
    listener.link.stop()


def test_a_stored_result_is_confirmed_to_its_device_and_a_duplicate_again(
    ingest: Ingest, publisher, site: str, make_result, receipts: Receipts, wait_for
) -> None:
    sent = [make_result(site, "cam-1", seed=i, crops=0) for i in range(3)]
    for r in sent:
        publisher.send(site, "cam-1", r)
    wait_for(lambda: sorted(receipts.ids()) == sorted(r.id for r in sent), what="receipts for 3 results")
    assert all(r.device == "cam-1" and not r.refused for r in receipts.got)
    publisher.send(site, "cam-1", sent[0])  # sent again: its receipt was lost, say
    wait_for(lambda: receipts.ids().count(sent[0].id) == 2, what="a second receipt for the duplicate")
    assert ingest.stats().stored == 3 and ingest.stats().duplicates == 1
    assert ingest.stats().receipts == len(receipts.got)


def test_a_result_that_can_never_be_stored_is_refused_in_its_receipt(
    ingest: Ingest, publisher, site: str, make_result, receipts: Receipts, wait_for
) -> None:
    bad = make_result(site, "cam-1", heatmap=b"<script>alert(1)</script>")
    good = make_result(site, "cam-1", seed=1)
    publisher.send(site, "cam-1", bad)
    publisher.send(site, "cam-1", good)
    wait_for(lambda: receipts.ids() == [good.id] and receipts.refused() == [bad.id], what="both receipts")
    reason = next(r.reason for r in receipts.got if r.refused)
    assert "heatmap" in reason and "not a JPEG or PNG" in reason
    assert ingest.stats().malformed == 1 and ingest.stats().stored == 1


def test_a_result_the_database_refuses_is_refused_in_its_receipt(
    ingest: Ingest, site: str, make_result, receipts: Receipts, wait_for, monkeypatch
) -> None:
    sent = [make_result(site, "cam-1", seed=i, crops=0) for i in range(3)]
    poison = sent[1].id
    refuse_in_writes(ingest, poison, monkeypatch)
    for r in sent:
        ingest.handle(topics.topic(site, "cam-1", topics.RESULT), messages.encode(r))
    wait_for(lambda: len(receipts.ids()) + len(receipts.refused()) == 3, what="3 results confirmed or refused")
    assert sorted(receipts.ids()) == sorted(r.id for r in sent if r.id != poison)
    assert receipts.refused() == [poison]
    assert "value too long" in next(r.reason for r in receipts.got if r.refused)
