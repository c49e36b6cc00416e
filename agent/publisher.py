"""Drains the spool into the broker, in order; a result leaves the spool only on the hub's receipt.

A broker's PUBACK says only that the broker took the message: a broker that
restarts, loses a shared subscription or sits behind a bridge may still never
hand it to the hub. So every result stays in the spool, and in this
publisher's books, until a `Receipt` from the hub names its id; one that
stays unconfirmed is sent again. The hub stores each id once and confirms a
duplicate as it confirmed the original, so a re-send is harmless.

Flow control, per connection: at most `window` results await their PUBACK
and at most `receipt_window` await their receipt, so a hub that is away holds
the spool's backlog on the station, not in the broker. When a result is sent
again: at once after a new connection (the broker may have lost what it held),
`resend_after_s` after a send with no PUBACK, and `receipt_timeout_s` after a
PUBACK with no receipt, doubling with each try up to `receipt_timeout_max_s`.

A result is sent for the first time only once: new sends take only sequence
numbers above the highest one ever sent, and one leaves the books only after
its row has left the spool, so nothing but a due re-send publishes it again.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

from agent.spool import Entry, Spool
from shared import messages
from shared.mqtt import MqttLink, NotConnected

log = logging.getLogger(__name__)

EARLY_ACK_S = 2.0


@dataclass(slots=True)
class Sent:
    """One result out of the spool and not yet confirmed by the hub."""

    rid: str
    due: float          # monotonic time of the next send unless a PUBACK or the receipt comes first
    tries: int = 1
    mid: int | None = None   # awaiting its PUBACK under this message id (of the current connection)


class Publisher:
    def __init__(self, spool: Spool, link: MqttLink, topic: str, stop: threading.Event,
                 window: int = 64, resend_after_s: float = 30.0, receipt_window: int = 500,
                 receipt_timeout_s: float = 30.0, receipt_timeout_max_s: float = 600.0) -> None:
        self.spool, self.link, self.topic, self.stop = spool, link, topic, stop
        self.window, self.resend_after_s = window, resend_after_s
        self.receipt_window = receipt_window
        self.receipt_timeout_s, self.receipt_timeout_max_s = receipt_timeout_s, receipt_timeout_max_s
        self.published = 0      # sends, re-sends included
        self.resent = 0
        self.acked = 0          # PUBACKs
        self.confirmed = 0      # results the hub's receipts removed from the spool
        self.refused = 0
        self._lock = threading.Lock()
        self._sent: dict[int, Sent] = {}        # seq -> its send
        self._by_mid: dict[int, int] = {}       # message id awaiting PUBACK -> seq
        self._by_rid: dict[str, int] = {}       # result id -> seq
        self._cursor = 0                        # the highest seq ever sent: new sends take only those above
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

    # -- broker and hub callbacks (MQTT network thread) -----------------------------

    def on_published(self, mid: int) -> None:
        """PUBACK from the broker (MqttLink callback): the receipt's clock starts."""
        with self._lock:
            seq = self._by_mid.pop(mid, None)
            entry = self._sent.get(seq) if seq is not None else None
            if entry is None:
                if seq is None:
                    self._early[mid] = time.monotonic()
                return
            self._puback(entry)

    def _puback(self, entry: Sent) -> None:
        entry.mid = None
        entry.due = time.monotonic() + min(self.receipt_timeout_s * 2 ** (entry.tries - 1),
                                           self.receipt_timeout_max_s)
        self.acked += 1

    def on_receipt(self, receipt: messages.Receipt) -> None:
        """The hub's receipt: its results leave the spool first, then these books."""
        try:
            confirmed = self.spool.confirm(receipt.ids) if receipt.ids else 0
            refused = self.spool.refuse(receipt.refused) if receipt.refused else 0
        except sqlite3.Error as exc:   # they stay, go out again and are confirmed again
            log.error("could not remove %d confirmed results from the spool: %s", len(receipt.ids), exc)
            return
        if refused:
            log.error("the hub refused %d result(s) for good (%s), e.g. %s; dropped from the spool",
                      refused, receipt.reason or "no reason given", receipt.refused[0])
        with self._lock:
            for rid in (*receipt.ids, *receipt.refused):
                seq = self._by_rid.pop(rid, None)
                if seq is not None:   # a PUBACK still to come finds no entry, which is right
                    del self._sent[seq]
            self.confirmed += confirmed
            self.refused += refused
        self._wake.set()

    # -- counters -------------------------------------------------------------------

    def in_flight(self) -> int:
        """Results sent on this connection and awaiting their PUBACK."""
        with self._lock:
            return len(self._by_mid)

    def unconfirmed(self) -> int:
        """Results sent and awaiting the hub's receipt (the rest of the spool is not sent yet)."""
        with self._lock:
            return len(self._sent)

    # -- the sender thread ----------------------------------------------------------

    def _reconnected(self) -> None:
        """A new connection: message ids start over, and the broker may have lost what it held."""
        now = time.monotonic()
        with self._lock:
            self._early.clear()
            self._by_mid.clear()
            for entry in self._sent.values():
                entry.mid = None
                entry.due = now

    def _due(self, room: int) -> list[int]:
        now = time.monotonic()
        with self._lock:
            for mid, arrived in list(self._early.items()):
                if now - arrived >= EARLY_ACK_S:
                    del self._early[mid]
            due = sorted(seq for seq, e in self._sent.items() if e.due <= now)
        return due[:room]

    def _run(self) -> None:
        was_connected = False
        while not self.stop.is_set():
            connected = self.link.connected.is_set()
            if connected and not was_connected:
                self._reconnected()
            was_connected = connected
            if not connected:
                self.link.connected.wait(0.5)
                continue
            sent = self._send_due() + self._send_new()
            if not sent:
                self._wake.wait(0.2)
                self._wake.clear()

    def _send_due(self) -> int:
        room = self.window - self.in_flight()
        due = self._due(room) if room > 0 else []
        if not due:
            return 0
        entries = {e.seq: e for e in self.spool.get(due)}
        with self._lock:
            for seq in due:
                if seq not in entries:   # gone from the spool meanwhile (confirmed, or made room for others)
                    entry = self._sent.pop(seq, None)
                    if entry is not None:
                        self._by_rid.pop(entry.rid, None)
        n = 0
        for seq in due:
            if seq in entries and self._publish(entries[seq], first=False):
                n += 1
        return n

    def _send_new(self) -> int:
        room = min(self.window - self.in_flight(), self.receipt_window - self.unconfirmed())
        if room <= 0:
            return 0
        n = 0
        for entry in self.spool.pending(self._cursor, limit=room):
            if not self._publish(entry, first=True):
                break
            n += 1
        return n

    def _publish(self, entry: Entry, first: bool) -> bool:
        """Send one result; False when the connection is gone."""
        try:
            mid = self.link.publish(self.topic, entry.payload, qos=1)
        except NotConnected:
            return False
        now = time.monotonic()
        with self._lock:
            if first:
                self._cursor = max(self._cursor, entry.seq)
                sent = self._sent.setdefault(entry.seq, Sent(entry.rid, now))
                self._by_rid[entry.rid] = entry.seq
            else:
                sent = self._sent.get(entry.seq)
                if sent is None:        # the receipt came while it was going out again
                    return True
                sent.tries += 1
                self.resent += 1
            self.published += 1
            sent.due = now + self.resend_after_s
            # the PUBACK may already have arrived on the network thread
            arrived = self._early.pop(mid, None)
            if arrived is not None and now - arrived < EARLY_ACK_S:
                self._puback(sent)
            else:
                sent.mid = mid
                self._by_mid[mid] = entry.seq
        return True
