"""MQTT -> SQL: the hub's ingest worker.

The MQTT network thread only decodes and validates (`Ingest.handle`); valid
messages go through a bounded queue to one writer thread that stores them in
batches. A batch is written as soon as the queue runs dry for `linger_ms`, is
`batch_size` long, or its first message has waited `flush_ms`: under light
load every result is written at once, under heavy load the batches grow by
themselves while the previous one commits.

Messages are acknowledged to the broker only after the transaction holding
them has committed (MQTT 5 manual acknowledgement, `manual_ack`): the broker
keeps what the hub has not acknowledged in the hub's persistent session, so a
hub that crashes, or is stopped while the database is down, loses nothing;
the broker delivers it again and the duplicates are ignored. `inflight` asks
the broker to send at most that many unacknowledged messages (MQTT 5 Receive
Maximum; Mosquitto 2.0 does not always hold to it), and the queue between the
network thread and the writer is bounded: when it is full the network thread
waits, so a slow database slows the broker's delivery down instead of growing
memory without bound.

Results are keyed by their ULID and inserted with ON CONFLICT DO NOTHING
(the writes are `hub.services.writes`), so a result re-sent by an agent's
spool is stored once. After each commit the hub
sends every device in the batch a `Receipt` (QoS 1) naming its results, the
duplicates included: the agent keeps a result in its spool until a receipt
names it, so whatever the broker loses on the way is sent again. A result the
hub can never store (it fails validation, or the database refuses it) is named
in the receipt's `refused` list instead. Status and metrics
messages update the device row. A malformed payload is counted and logged
(cut short), never stored, and never stops ingest.

With an MQTT 5 broker, results and metrics are read through a shared
subscription (``$share/<group>/...``) so several ingest processes split the
load; status stays an ordinary subscription because brokers do not send
retained messages (the birth messages) to shared ones.

`Ingest` is one class and this is one module: its two threads (the network
thread that validates, the writer that stores, sends receipts and acknowledges)
share its queue, counters and stop flag, and the hand-over between them is
what has to be read in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope, WriteReport
from hub.store import Images, StoreError, image_kind
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import PROTOCOL_5, Ack, MqttLink, NotConnected

log = logging.getLogger(__name__)

LOG_PAYLOAD_BYTES = 64  # payloads in logs are cut to this
LOG_EVERY_S = 5.0  # at most one malformed-payload warning per topic in this time
RETRY_MAX_S = 10.0  # longest wait between attempts while the database is unreachable
GIVE_UP_ON_STOP_S = 10.0  # how long stop() keeps retrying a batch the database refuses

EXPECTED = {
    topics.RESULT: messages.Result,
    topics.STATUS: messages.Status,
    topics.METRICS: messages.Metrics,
}
_STOP = object()


@dataclass(frozen=True, slots=True)
class IngestStats:
    """Counters since start; every received message ends in exactly one of the others.

    received = stored + duplicates + malformed + updates + ignored + failed + queued
    (+ those in the batch being written; with manual acknowledgement `queued` also
    counts the acknowledgements of dropped messages waiting their turn).
    """

    received: int = 0
    stored: int = 0  # new results written
    duplicates: int = 0  # results whose id was already stored
    malformed: int = 0  # payloads refused by validation, never stored
    updates: int = 0  # status and metrics messages applied to device rows
    ignored: int = 0  # empty payloads (a retained status being cleared)
    failed: int = 0  # valid messages the database refused (see the log)
    queued: int = 0
    receipts: int = 0  # receipt messages sent to devices (not part of the sum above)


# what the writer thread takes from the queue: a message to store (None: only acknowledge)
Item = tuple[Envelope | None, Ack | None]


def validate(address: topics.Address, msg: Any) -> None:
    """Checks `decode` cannot make: the payload names its topic's device; images are images."""
    if msg.device != address.device:
        raise messages.MessageError(
            f"{msg.TYPE} names device {msg.device!r} but arrived on "
            f"the topic of {address.site}/{address.device}"
        )
    site = getattr(msg, "site", "")
    if site and site != address.site:
        raise messages.MessageError(
            f"{msg.TYPE} names site {site!r} but arrived on "
            f"the topic of {address.site}/{address.device}"
        )
    if isinstance(msg, messages.Result):
        images = [("heatmap", msg.heatmap), ("thumbnail", msg.thumbnail), ("frame", msg.frame)]
        images += [(f"crops[{i}].jpeg", c.jpeg) for i, c in enumerate(msg.crops)]
        for name, data in images:
            if data and image_kind(data) is None:
                raise messages.MessageError(f"result.{name}: not a JPEG or PNG image")


def _result_ids(batch: Sequence[Envelope], exc: BaseException) -> dict[str, str]:
    """id -> reason for the results among messages the database refused."""
    reason = f"the hub's database refused it: {str(exc).splitlines()[0]}"
    return {e.message.id: reason for e in batch if isinstance(e.message, messages.Result)}


def _transient(exc: SQLAlchemyError) -> bool:
    """Errors that waiting can heal: the database is down, restarting or locked."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError))


class Ingest:
    """Subscribes to the fleet's results, status and metrics and writes them to the database.

    `start()` returns at once; the connection is made in the background and
    kept up by MqttLink (`wait_ready` blocks until the broker has confirmed
    every subscription). `stop()` stores and acknowledges what was received,
    then disconnects.
    """

    def __init__(
        self,
        db: Database,
        store: Images,
        broker: BrokerConfig,
        *,
        client_id: str = "kdfleet-hub-ingest",
        site: str = "+",
        shared_group: str | None = "hub",
        batch_size: int = 500,
        flush_ms: int = 200,
        linger_ms: int = 5,
        inflight: int = 1000,
        queue_size: int = 10_000,
        protocol: str | None = None,
        persistent: bool = True,
        manual_ack: bool = True,
        images_when_down: str = "wait",
    ) -> None:
        if min(batch_size, flush_ms, queue_size, inflight) < 1 or linger_ms < 0:
            raise ValueError(
                "batch_size, flush_ms, inflight and queue_size must be positive, "
                "linger_ms not negative"
            )
        self.broker = broker
        self.client_id = client_id
        self.site = site if site == "+" else topics.check_name(site, "site")
        self.shared_group = topics.check_name(shared_group, "group") if shared_group else None
        self.batch_size = batch_size
        self.flush_s = flush_ms / 1000
        self.linger_s = linger_ms / 1000
        self.inflight = inflight
        self.protocol = protocol
        # a broker session that keeps QoS 1 results for the hub while it restarts
        self.persistent = persistent
        self.manual_ack = manual_ack
        # the image store failing: "wait" (retry; nothing acknowledged or receipted meanwhile) or
        # "without_images" (store the results without their images)
        self.images_when_down = images_when_down
        self.writer = BatchWriter(db, store)
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._counts = {f.name: 0 for f in dataclasses.fields(IngestStats) if f.name != "queued"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._link: MqttLink | None = None
        self._writer_thread: threading.Thread | None = None
        self._last_warning: dict[str, float] = {}

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> Ingest:
        self._stop.clear()
        self._writer_thread = threading.Thread(
            target=self._write_loop, name="hub-ingest-writer", daemon=True
        )
        self._writer_thread.start()
        self._link = MqttLink(
            self.broker,
            self.client_id,
            subscriptions=self.subscriptions,  # decided once the protocol is known
            on_message=self.handle,
            protocol=self.protocol,
            clean_start=not self.persistent,
            manual_ack=self.manual_ack,
            receive_maximum=self.inflight,
        )
        self._link.start()   # assigned first: a persistent session's messages may be stored and confirmed at once
        log.info(
            "ingest connecting to %s as %s (site %s, shared group %s)",
            self.broker.url,
            self.client_id,
            self.site,
            self.shared_group or "none",
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Store (and acknowledge) everything already received, then disconnect.

        With manual acknowledgement, messages arriving after the stop began are
        left unacknowledged: the broker keeps them for the next start.
        Without it, the connection is closed first so nothing is acknowledged
        that will not be stored.
        """
        self._stop.set()
        link, self._link = self._link, None
        if link is not None and not self.manual_ack:
            link.stop()  # joins the network thread: nothing is handled after this
        if self._writer_thread is not None:
            self._queue.put(_STOP)
            self._writer_thread.join(timeout)
            if self._writer_thread.is_alive():
                log.error(
                    "ingest writer did not finish within %.0f s; %d messages not stored",
                    timeout,
                    self._queue.qsize(),
                )
        if link is not None and self.manual_ack:
            link.stop()  # after the writer's acknowledgements went out

    @property
    def link(self) -> MqttLink | None:
        return self._link

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (subscriptions sent; their acknowledgements may be in flight)."""
        link = self._link
        return link is not None and link.wait_connected(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """True once the broker has confirmed every subscription: nothing published now is missed."""
        link = self._link
        return link is not None and link.subscribed.wait(timeout)

    def stats(self) -> IngestStats:
        with self._lock:
            return IngestStats(**self._counts, queued=self._queue.qsize())

    def subscriptions(self, protocol: str) -> list[tuple[str, int]]:
        """Topic filters for the negotiated protocol (shared ones only with MQTT 5)."""
        group = self.shared_group if protocol == PROTOCOL_5 else None
        return [
            (topics.subscription(topics.STATUS, site=self.site), 1),
            (topics.subscription(topics.RESULT, site=self.site, shared_group=group), 1),
            (topics.subscription(topics.METRICS, site=self.site, shared_group=group), 1),
        ]

    # -- receiving (MQTT network thread) -------------------------------------------

    def handle(self, topic: str, payload: bytes, ack: Ack | None = None) -> None:
        """Validate one message and queue it for the writer; count and drop a malformed one.

        `ack` (manual acknowledgement) is called by the writer once the
        message is stored, or once it is known never to be stored.
        """
        if ack is not None and self._stop.is_set():
            return  # left with the broker: delivered again after the next start
        self._count("received")
        received_at = datetime.now(UTC)
        envelope = None
        msg = None
        try:
            address = topics.parse(topic)
            expected = EXPECTED.get(address.kind)
            if expected is None:
                raise messages.MessageError(f"the hub does not ingest {address.kind!r} messages")
            if payload:  # empty: a retained status being cleared; nothing to store
                msg = messages.decode(payload, expect=expected)
                validate(address, msg)
                envelope = Envelope(address.site, address.device, msg, received_at)
            else:
                self._count("ignored")
        except (topics.TopicError, messages.MessageError) as exc:
            self._count("malformed")
            self._warn(
                topic,
                "dropped a malformed message on %s: %s; payload (%d bytes) %r",
                topic,
                exc,
                len(payload),
                bytes(payload[:LOG_PAYLOAD_BYTES]),
            )
            if isinstance(msg, messages.Result):  # readable, but never storable: the device may forget it
                self._send_receipts({}, {(address.site, address.device): [msg.id]}, str(exc))
        if envelope is None and ack is None:
            return
        # acknowledgements go through the writer too, so they leave in the order messages came
        self._enqueue((envelope, ack))

    def _enqueue(self, item: Item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                writer = self._writer_thread
                if self._stop.is_set() and (writer is None or not writer.is_alive()):
                    if item[0] is not None:
                        self._count("failed")  # the writer is gone; nobody will store it
                    return
                self._warn(
                    "queue",
                    "ingest queue full (%d): the database is not keeping up",
                    self._queue.maxsize,
                )

    # -- writing (writer thread) -----------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[Item] = [first]
            stopping = self._fill(batch)
            self._flush(batch)
            if stopping:
                return

    def _fill(self, batch: list[Item]) -> bool:
        """Add queued items until the batch is full, the queue stays empty for linger_s or the
        first item has waited flush_s; True when the stop marker came up."""
        deadline = time.monotonic() + self.flush_s
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                wait = min(self.linger_s, deadline - time.monotonic())
                if wait <= 0:
                    return False
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _flush(self, items: list[Item]) -> None:
        """Store a batch, send its receipts, then acknowledge it; a batch the stop gave up on stays
        unacknowledged and unconfirmed."""
        batch = [env for env, _ in items if env is not None]
        if batch:
            refused = self._store(batch)
            if refused is None:
                return
            self._confirm(batch, refused)
        for _, ack in items:
            if ack is not None:
                ack()

    def _store(self, batch: list[Envelope]) -> dict[str, str] | None:
        """Store a batch; wait out an unreachable database, isolate a message it refuses.

        Returns the results the database refused for good (id -> reason); None only when
        stopping while the database still fails: those messages are not acknowledged, so
        the broker delivers them again.
        """
        delay, gave_up_at = 0.2, None
        while True:
            try:
                self._record(self.writer.write(batch))
                return {}
            except (StoreError, SQLAlchemyError) as exc:
                if isinstance(exc, StoreError) or not _transient(exc):
                    if len(batch) > 1:
                        return self._store_one_by_one(batch)
                    self._fail(batch, exc)
                    return _result_ids(batch, exc)
                log.warning(
                    "database unavailable (%s); retrying %d messages in %.1f s",
                    str(exc).splitlines()[0],
                    len(batch),
                    delay,
                )
            except OSError as exc:  # disk full, the object store down: an operator can fix it while we wait
                if self.images_when_down == "without_images":
                    log.error("image store write failed (%s); storing %d messages without their images "
                              "(images.when_down)", exc, len(batch))
                    try:
                        self._record(self.writer.write(batch, images=False))
                        return {}
                    except SQLAlchemyError as db_exc:
                        log.warning("database unavailable too (%s)", str(db_exc).splitlines()[0])
                else:
                    log.error(
                        "image store write failed (%s); retrying %d messages in %.1f s",
                        exc,
                        len(batch),
                        delay,
                    )
            if self._stop.is_set():
                gave_up_at = gave_up_at or time.monotonic() + GIVE_UP_ON_STOP_S
                if time.monotonic() >= gave_up_at:
                    self._fail(
                        batch,
                        RuntimeError(
                            "still failing while stopping"
                            + ("; left with the broker for the next start" if self.manual_ack else "")
                        ),
                    )
                    return None
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _store_one_by_one(self, batch: list[Envelope]) -> dict[str, str]:
        """Isolate the message the database refuses so the rest of the batch is stored."""
        refused: dict[str, str] = {}
        for env in batch:
            try:
                self._record(self.writer.write([env]))
            except (StoreError, SQLAlchemyError, OSError) as exc:
                self._fail([env], exc)
                refused |= _result_ids([env], exc)
        return refused

    def _confirm(self, batch: list[Envelope], refused: dict[str, str]) -> None:
        """Receipts for the results of a committed batch: stored (or stored before), or refused."""
        stored: dict[tuple[str, str], list[str]] = {}
        lost: dict[tuple[str, str], list[str]] = {}
        for env in batch:
            if isinstance(env.message, messages.Result):
                rid = env.message.id
                (lost if rid in refused else stored).setdefault((env.site, env.device), []).append(rid)
        reason = next(iter(refused.values()), "")
        self._send_receipts(stored, lost, reason)

    def _send_receipts(
        self, stored: dict[tuple[str, str], list[str]], refused: dict[tuple[str, str], list[str]], reason: str
    ) -> None:
        """One receipt per device (more past MAX_RECEIPT_IDS); a device that misses one sends again."""
        link = self._link
        for site, device in sorted(stored.keys() | refused.keys()):
            ids = list(dict.fromkeys(stored.get((site, device), ())))  # each once, in arrival order
            bad = refused.get((site, device), [])
            step = messages.MAX_RECEIPT_IDS
            for i in range(0, max(len(ids), len(bad)), step):
                receipt = messages.Receipt(
                    device=device, ts=time.time(), ids=tuple(ids[i:i + step]),
                    refused=tuple(bad[i:i + step]), reason=reason[:messages.MAX_TEXT] if bad else "",
                )
                try:
                    if link is None:
                        raise NotConnected("ingest is stopping")
                    link.publish(topics.topic(site, device, topics.RECEIPT), messages.encode(receipt), qos=1)
                    self._count("receipts")
                except NotConnected:
                    log.debug("no receipt to %s/%s now (%d ids): it will send them again", site, device, len(ids))

    def _fail(self, batch: list[Envelope], exc: BaseException) -> None:
        self._count("failed", len(batch))
        first = batch[0].message
        log.error(
            "could not store %d message(s) (first: %s %s from %s/%s): %s",
            len(batch),
            first.TYPE,
            getattr(first, "id", ""),
            batch[0].site,
            batch[0].device,
            str(exc).splitlines()[0],
        )

    def _record(self, report: WriteReport) -> None:
        with self._lock:
            self._counts["stored"] += report.stored
            self._counts["duplicates"] += report.duplicates
            self._counts["updates"] += report.updates

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _warn(self, key: str, fmt: str, *args: Any) -> None:
        """Log at most once per LOG_EVERY_S per key, so a broken device cannot flood the log."""
        now = time.monotonic()
        if now - self._last_warning.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_warning[key] = now
            log.warning(fmt, *args)
