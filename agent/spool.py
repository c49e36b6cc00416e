"""The result spool: every result is on disk before it is published, and leaves only on the hub's receipt.

A broker's PUBACK says only that the broker took a result; a result leaves
the spool when the hub's receipt names its id (it is stored then), or when the
hub refuses it for good.

SQLite in WAL mode with ``synchronous=FULL``: a committed result survives a
kill -9 and a power cut (NORMAL would survive a crash of the process but may
lose the last commits on power loss, and stations lose power). Results leave
in the order they were made.

Bounds and the policy when full (count, bytes or age): expired results go
first; then the oldest normal results; anomalies are dropped only when no
normal result is left, oldest first. Every drop is counted by reason.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    anomalous INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    rid TEXT
);
CREATE INDEX IF NOT EXISTS spool_normal ON spool (anomalous, seq);
CREATE TABLE IF NOT EXISTS dropped (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
RID_INDEX = "CREATE INDEX IF NOT EXISTS spool_rid ON spool (rid)"
CHUNK = 500  # ids per DELETE: well under SQLite's limit on bound parameters


class SpoolFull(RuntimeError):
    """The disk under the spool refused a write (full disk); the caller must keep the result."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    payload: bytes
    rid: str   # the result's id, which the hub's receipt names


class Spool:
    """A bounded, ordered, durable queue of encoded results."""

    def __init__(self, path: str | Path, max_results: int = 100_000, max_bytes: int = 2 * 1024**3,
                 max_age_s: float = 7 * 24 * 3600.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_results, self.max_bytes, self.max_age_s = max_results, max_bytes, max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_result_ids()
        self._count, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()

    def _add_result_ids(self) -> None:
        """A spool written before receipts existed: give it the id column, filled from the payloads."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(spool)")}
        if "rid" not in columns:
            self._db.execute("ALTER TABLE spool ADD COLUMN rid TEXT")
        rows = self._db.execute("SELECT seq, payload FROM spool WHERE rid IS NULL").fetchall()
        if rows:
            from shared.messages import MessageError, decode

            def rid(payload: bytes) -> str:
                try:
                    return decode(payload).id
                except (MessageError, AttributeError):
                    return ""   # unreadable: it goes out again and again until it ages out

            self._db.executemany("UPDATE spool SET rid = ? WHERE seq = ?", [(rid(p), s) for s, p in rows])
        self._db.execute(RID_INDEX)

    def put(self, payload: bytes, anomalous: bool, rid: str) -> int:
        """Store a result (its id `rid`) durably; returns its sequence number. Makes room by the policy first."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._make_room(len(payload))
                cur = self._db.execute(
                    "INSERT INTO spool (created, anomalous, size, payload, rid) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), int(anomalous), len(payload), payload, rid))
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
                raise SpoolFull(f"spool {self.path}: cannot write ({exc}); free disk space") from exc
            self._count += 1
            self._bytes += len(payload)
            return int(cur.lastrowid)

    def _make_room(self, incoming: int) -> None:
        cutoff = time.time() - self.max_age_s
        expired = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool WHERE created < ?",
                                   (cutoff,)).fetchone()
        if expired[0]:
            self._db.execute("DELETE FROM spool WHERE created < ?", (cutoff,))
            self._note_drop("expired", expired[0])
            self._count -= expired[0]
            self._bytes -= expired[1]
        for anomalous, reason in ((0, "full_normal"), (1, "full_anomaly")):
            while self._count and (self._count + 1 > self.max_results or self._bytes + incoming > self.max_bytes):
                rows = self._db.execute("SELECT seq, size FROM spool WHERE anomalous = ? ORDER BY seq LIMIT 64",
                                        (anomalous,)).fetchall()
                if not rows:
                    break
                need_n = self._count + 1 - self.max_results
                need_b = self._bytes + incoming - self.max_bytes
                victims, freed = [], 0
                for seq, size in rows:
                    if len(victims) >= need_n and freed >= need_b:
                        break
                    victims.append(seq)
                    freed += size
                self._db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in victims])
                self._note_drop(reason, len(victims))
                self._count -= len(victims)
                self._bytes -= freed

    def _note_drop(self, reason: str, n: int) -> None:
        self._db.execute("INSERT INTO dropped (reason, count) VALUES (?, ?) "
                         "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count", (reason, n))

    def pending(self, after: int = 0, limit: int = 100) -> list[Entry]:
        """Up to `limit` stored results with seq > `after`, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, payload, rid FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        return [Entry(int(s), bytes(p), r or "") for s, p, r in rows]

    def get(self, seqs: list[int]) -> list[Entry]:
        """The results of these sequence numbers still in the spool, oldest first."""
        out: list[Entry] = []
        with self._lock:
            for i in range(0, len(seqs), CHUNK):
                part = seqs[i:i + CHUNK]
                marks = ",".join("?" * len(part))
                out += [Entry(int(s), bytes(p), r or "") for s, p, r in self._db.execute(
                    f"SELECT seq, payload, rid FROM spool WHERE seq IN ({marks})", part)]
        return sorted(out, key=lambda e: e.seq)

    def confirm(self, rids: list[str] | tuple[str, ...]) -> int:
        """The hub has stored these results: forget them. Returns how many were here."""
        return self._remove(rids)

    def refuse(self, rids: list[str] | tuple[str, ...]) -> int:
        """The hub will never store these results: forget them, counted as dropped ("refused")."""
        return self._remove(rids, reason="refused")

    def _remove(self, rids: list[str] | tuple[str, ...], reason: str = "") -> int:
        removed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(rids), CHUNK):
                    part = list(rids[i:i + CHUNK])
                    marks = ",".join("?" * len(part))
                    sizes = self._db.execute(f"DELETE FROM spool WHERE rid IN ({marks}) RETURNING size",
                                             part).fetchall()
                    removed += len(sizes)
                    self._bytes -= sum(size for (size,) in sizes)
                if reason and removed:
                    self._note_drop(reason, removed)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError:
                self._db.execute("ROLLBACK")
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
                raise
            self._count -= removed
        return removed

    def depth(self) -> int:
        return self._count

    def size_bytes(self) -> int:
        return self._bytes

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT reason, count FROM dropped").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
