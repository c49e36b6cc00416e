"""Drains the spool into the broker, in order, deleting each result only on its PUBACK.

While connected it keeps up to `window` results in flight. A result whose
acknowledgement has not come after `resend_after_s` (or whose connection was
lost) is sent again: the hub stores each id once, so a duplicate is harmless
and a loss is impossible.
"""
from __future__ import annotations

import logging
import threading
import time

from agent.spool import Spool
from shared.mqtt import MqttLink, NotConnected

log = logging.getLogger(__name__)

EARLY_ACK_S = 2.0


class Publisher:
    def __init__(self, spool: Spool, link: MqttLink, topic: str, stop: threading.Event,
                 window: int = 64, resend_after_s: float = 30.0) -> None:
        self.spool, self.link, self.topic, self.stop = spool, link, topic, stop
        self.window, self.resend_after_s = window, resend_after_s
        self.published = 0
        self.acked = 0
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[int, float]] = {}   # mid -> (seq, sent at)
        self._sent_seqs: set[int] = set()
        # PUBACKs that beat the bookkeeping of their publish: mid -> arrival; kept briefly, since
        # mids are reused and a stale one must never acknowledge a later message
        self._early: dict[int, float] = {}
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def notify(self) -> None:
        """A new result is in the spool."""
        self._wake.set()

    def on_published(self, mid: int) -> None:
        """PUBACK from the broker (MqttLink callback)."""
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early[mid] = time.monotonic()
                return
            self._sent_seqs.discard(entry[0])
        self._acked(entry[0])

    def _acked(self, seq: int) -> None:
        self.spool.ack(seq)
        self.acked += 1
        self._wake.set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _expire(self, connected: bool) -> None:
        """Forget sends that will not be acknowledged (lost connection, or too old), so they go again."""
        now = time.monotonic()
        with self._lock:
            if not connected:
                self._early.clear()
            for mid, arrived in list(self._early.items()):
                if now - arrived >= EARLY_ACK_S:
                    del self._early[mid]
            for mid, (seq, sent) in list(self._inflight.items()):
                if not connected or now - sent > self.resend_after_s:
                    del self._inflight[mid]
                    self._sent_seqs.discard(seq)

    def _run(self) -> None:
        was_connected = False
        while not self.stop.is_set():
            connected = self.link.connected.is_set()
            if connected != was_connected:
                self._expire(connected=False)  # a new connection: resend whatever was unacknowledged
                was_connected = connected
            if not connected:
                self.link.connected.wait(0.5)
                continue
            self._expire(connected=True)
            room = self.window - self.in_flight()
            sent = 0
            if room > 0:
                for entry in self.spool.pending(0, limit=room + len(self._sent_seqs)):
                    if entry.seq in self._sent_seqs:
                        continue
                    if sent >= room:
                        break
                    try:
                        mid = self.link.publish(self.topic, entry.payload, qos=1)
                    except NotConnected:
                        break
                    with self._lock:
                        # the PUBACK may already have arrived on the network thread
                        arrived = self._early.pop(mid, None)
                        early = arrived is not None and time.monotonic() - arrived < EARLY_ACK_S
                        if not early:
                            self._inflight[mid] = (entry.seq, time.monotonic())
                            self._sent_seqs.add(entry.seq)
                    if early:
                        self._acked(entry.seq)
                    sent += 1
                    self.published += 1
            if not sent:
                self._wake.wait(0.2)
                self._wake.clear()
