import multiprocessing
import time
import os
import signal

import pytest

from agent.spool import Spool


def test_order_ack_and_reopen(tmp_path):
    s = Spool(tmp_path / "s.db")
    seqs = [s.put(f"r{i}".encode(), anomalous=i % 3 == 0) for i in range(10)]
    assert seqs == sorted(seqs)
    assert [e.payload for e in s.pending(limit=100)] == [f"r{i}".encode() for i in range(10)]
    for seq in seqs[:4]:
        s.ack(seq)
    assert s.depth() == 6
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.depth() == 6 and s.size_bytes() == sum(len(f"r{i}") for i in range(4, 10))
    assert [e.payload for e in s.pending()] == [f"r{i}".encode() for i in range(4, 10)]
    assert [e.seq for e in s.pending(after=seqs[6])] == seqs[7:]


def test_full_spool_drops_oldest_normal_first_then_oldest_anomalies(tmp_path):
    s = Spool(tmp_path / "s.db", max_results=5)
    for i in range(5):
        s.put(f"{'a' if i in (0, 2) else 'n'}{i}".encode(), anomalous=i in (0, 2))
    s.put(b"n5", anomalous=False)        # full: the oldest normal (n1) goes
    assert [e.payload for e in s.pending()] == [b"a0", b"a2", b"n3", b"n4", b"n5"]
    for i in range(6, 9):
        s.put(f"a{i}".encode(), anomalous=True)   # n3, n4, n5 go before any anomaly
    assert [e.payload for e in s.pending()] == [b"a0", b"a2", b"a6", b"a7", b"a8"]
    s.put(b"a9", anomalous=True)         # only anomalies left: the oldest goes
    assert [e.payload for e in s.pending()] == [b"a2", b"a6", b"a7", b"a8", b"a9"]
    assert s.dropped() == {"full_normal": 4, "full_anomaly": 1}


def test_byte_bound_and_age_bound(tmp_path):
    s = Spool(tmp_path / "s.db", max_bytes=3000)
    for _ in range(5):
        s.put(b"x" * 1000, anomalous=False)
    assert s.depth() == 3 and s.size_bytes() <= 3000
    aged = Spool(tmp_path / "aged.db", max_age_s=0.001)
    aged.put(b"old", anomalous=True)
    time.sleep(0.01)
    aged.put(b"new", anomalous=False)
    assert [e.payload for e in aged.pending()] == [b"new"] and aged.dropped() == {"expired": 1}


def _writer(path: str, ready) -> None:
    s = Spool(path)
    for i in range(100_000):
        s.put(b"%d" % i, anomalous=False)
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
            s.put(b"x" * 4096, anomalous=True)
    assert s.depth() == len(s.pending(limit=1000))  # counters stay true to the file
