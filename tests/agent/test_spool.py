import multiprocessing
import sqlite3
import time
import os
import signal

import pytest

from agent.spool import Spool
from shared import messages
from shared.ids import new_ulid


def test_order_confirm_and_reopen(tmp_path):
    s = Spool(tmp_path / "s.db")
    rids = [new_ulid() for _ in range(10)]
    seqs = [s.put(f"r{i}".encode(), anomalous=i % 3 == 0, rid=rids[i]) for i in range(10)]
    assert seqs == sorted(seqs)
    assert [e.payload for e in s.pending(limit=100)] == [f"r{i}".encode() for i in range(10)]
    assert [e.rid for e in s.get([seqs[5], seqs[1]])] == [rids[1], rids[5]]
    assert s.confirm([*rids[:4], new_ulid()]) == 4     # an id it does not hold is no error
    assert s.confirm(rids[:4]) == 0                    # a receipt that comes twice changes nothing
    assert s.depth() == 6 and s.get(seqs[:4]) == []
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.depth() == 6 and s.size_bytes() == sum(len(f"r{i}") for i in range(4, 10))
    assert [e.payload for e in s.pending()] == [f"r{i}".encode() for i in range(4, 10)]
    assert [e.seq for e in s.pending(after=seqs[6])] == seqs[7:]


def test_refused_results_leave_and_are_counted(tmp_path):
    s = Spool(tmp_path / "s.db")
    rids = [new_ulid() for _ in range(3)]
    for i, rid in enumerate(rids):
        s.put(b"x" * (i + 1), anomalous=False, rid=rid)
    assert s.refuse(rids[1:2]) == 1
    assert s.depth() == 2 and s.size_bytes() == 1 + 3 and s.dropped() == {"refused": 1}


def test_a_spool_from_before_receipts_gets_its_result_ids(tmp_path):
    path = tmp_path / "old.db"
    result = messages.Result(id=new_ulid(), ts=1.0, site="s", device="d", station="st", cls="c", model_version="1",
                             score=1.0, norm_score=1.0, threshold=1.0, verdict="ok", latency_ms=1.0, heatmap=b"")
    with sqlite3.connect(path) as db:   # the table as the agent wrote it before
        db.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
                   "anomalous INTEGER NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL)")
        payload = messages.encode(result)
        db.execute("INSERT INTO spool (created, anomalous, size, payload) VALUES (?, 0, ?, ?)",
                   (time.time(), len(payload), payload))
    s = Spool(path)
    assert [e.rid for e in s.pending()] == [result.id]
    assert s.confirm([result.id]) == 1 and s.depth() == 0


def test_full_spool_drops_oldest_normal_first_then_oldest_anomalies(tmp_path):
    s = Spool(tmp_path / "s.db", max_results=5)
    for i in range(5):
        s.put(f"{'a' if i in (0, 2) else 'n'}{i}".encode(), anomalous=i in (0, 2), rid=f"r{i}")
    s.put(b"n5", anomalous=False, rid="r5")        # full: the oldest normal (n1) goes
    assert [e.payload for e in s.pending()] == [b"a0", b"a2", b"n3", b"n4", b"n5"]
    for i in range(6, 9):
        s.put(f"a{i}".encode(), anomalous=True, rid=f"r{i}")   # n3, n4, n5 go before any anomaly
    assert [e.payload for e in s.pending()] == [b"a0", b"a2", b"a6", b"a7", b"a8"]
    s.put(b"a9", anomalous=True, rid="r9")         # only anomalies left: the oldest goes
    assert [e.payload for e in s.pending()] == [b"a2", b"a6", b"a7", b"a8", b"a9"]
    assert s.dropped() == {"full_normal": 4, "full_anomaly": 1}


def test_byte_bound_and_age_bound(tmp_path):
    s = Spool(tmp_path / "s.db", max_bytes=3000)
    for _ in range(5):
        s.put(b"x" * 1000, anomalous=False, rid=new_ulid())
    assert s.depth() == 3 and s.size_bytes() <= 3000
    aged = Spool(tmp_path / "aged.db", max_age_s=0.001)
    aged.put(b"old", anomalous=True, rid="old")
    time.sleep(0.01)
    aged.put(b"new", anomalous=False, rid="new")
    assert [e.payload for e in aged.pending()] == [b"new"] and aged.dropped() == {"expired": 1}


def _writer(path: str, ready) -> None:
    s = Spool(path)
    for i in range(100_000):
        s.put(b"%d" % i, anomalous=False, rid=str(i))
        if i == 200:
            ready.set()


def test_kill_9_loses_no_committed_result(tmp_path):
    path = str(tmp_path / "s.db")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(path, ready))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    s = Spool(path)
    payloads = [int(e.payload) for e in s.pending(limit=1_000_000)]
    # every committed put survived, in order, with no gap
    assert len(payloads) > 200 and payloads == list(range(len(payloads)))


def test_unwritable_spool_raises_a_clear_error(tmp_path):
    from agent.spool import SpoolFull

    s = Spool(tmp_path / "s.db")
    s._db.execute("PRAGMA max_page_count = 8")   # stands in for a full disk: SQLITE_FULL
    with pytest.raises(SpoolFull, match="free disk space"):
        for _ in range(100):
            s.put(b"x" * 4096, anomalous=True, rid=new_ulid())
    assert s.depth() == len(s.pending(limit=1000))  # counters stay true to the file
