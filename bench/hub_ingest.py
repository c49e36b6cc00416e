"""One ingest run of the hub benchmarks: a private Mosquitto, ingest worker processes and publisher
processes around a fresh database, and the committed rows counted as they arrive.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.hub_data import fresh_database, result_messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    """A private Mosquitto on a free loopback port, with queues deep enough for a burst."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # the hub's session may fall behind a burst: keep every QoS 1 message for it
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 100\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto ({binary}) did not start on port {port}") from None
                time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _worker(db_url: str, broker_url: str, data_dir: str, images: dict[str, Any], index: int, ready: Any, stop: Any,
            out: Any) -> None:
    """One ingest process, as `kdfleet hub ingest` runs it (images: the [images] settings); reports its
    counters at the end."""
    import logging

    from hub.config import HubConfig, ImagesConfig
    from hub.db.session import Database
    from hub.ingest import Ingest
    from shared.config import BrokerConfig

    logging.basicConfig(level=logging.WARNING)
    db = Database(db_url)
    ingest = Ingest(
        db,
        HubConfig(data_dir=data_dir, images=ImagesConfig(**images)).open_images(),
        BrokerConfig.from_url(broker_url),
        client_id=f"bench-hub-{index}",
        shared_group="hub",
        persistent=False,
    ).start()
    if not ingest.wait_ready(20):
        out.put((index, "not subscribed"))
        return
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    ready.release()
    stop.wait()
    ingest.stop()
    db.dispose()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out.put((index, dataclasses.asdict(ingest.stats()) | {"cpu_s": cpu}))


def _publisher(
    broker_url: str, index: int, count: int, pool: int, rate: float, go: Any, ready: Any, out: Any
) -> None:
    """One agent: prepares its results, waits for the start, publishes them at QoS 1, `rate` a
    second (0: as fast as the broker takes them)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.config import BrokerConfig

    payloads = result_messages(index, count, pool)
    broker = BrokerConfig.from_url(broker_url)
    acked = threading.Semaphore(0)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-agent-{index}", protocol=paho.MQTTv5)
    client.on_publish = lambda *a: acked.release()
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    ready.release()
    go.wait()
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.time()
    for i, (topic, payload) in enumerate(payloads):
        if rate and i % 8 == 0:  # paced in small bursts: a camera's results come a frame apart
            ahead = start + i / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
        client.publish(topic, payload, qos=1)
    for _ in payloads:
        acked.acquire()
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.disconnect()
    client.loop_stop()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out.put((index, start, end, sum(len(p) for _, p in payloads), cpu))


@dataclasses.dataclass
class IngestRun:
    workers: int
    mode: str  # "paced" | "burst"
    sent: int
    stored: int
    distinct: int
    redelivered: int
    offered: float  # results/s the publishers achieved
    rate: float  # paced: committed/s while publishing; burst: drain 10-90 %
    lag_s: float  # from the last publish to the last commit
    payload_kb: float
    cpu_us: float  # ingest processes' CPU time per result
    agent_cpu_us: float  # publisher processes' CPU time per result (loopback's tax on the hub)


def _count(db_url: str) -> Callable[[], tuple[int, int]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)

    def count() -> tuple[int, int]:
        with engine.connect() as c:
            return tuple(c.execute(text("SELECT count(*), count(DISTINCT id) FROM results")).one())

    count.engine = engine  # type: ignore[attr-defined]
    return count


def _between(samples: list[tuple[float, int]], lo: float, hi: float) -> float:
    """Rows per second committed between times `lo` and `hi`, interpolated from the samples."""

    def at(t: float) -> float:
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        return samples[-1][1] if t > samples[-1][0] else 0

    return (at(hi) - at(lo)) / (hi - lo) if hi > lo else 0.0


def _when(samples: list[tuple[float, int]], level: float) -> float:
    """When the committed count reached `level`."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if c0 <= level <= c1 and c1 > c0:
            return t0 + (t1 - t0) * (level - c0) / (c1 - c0)
    return samples[-1][0]


def ingest_run(
    workers: int, mode: str, args: argparse.Namespace, tmp: Path, images: dict[str, Any] | None = None
) -> IngestRun:
    """One run: workers up, publishers go, rows counted until all are stored (or 20 s of no news)."""
    ctx = mp.get_context("spawn")
    paced = mode == "paced"
    total_rate = args.rate if paced else 0.0
    per = int(args.rate * args.seconds / args.publishers) if paced else args.results // args.publishers
    total = per * args.publishers
    with mosquitto(tmp) as broker, fresh_database(args.admin_url) as db_url:
        data_dir = tmp / f"data-{workers}-{mode}"
        ready, stop, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(db_url, broker, str(data_dir), images or {}, i, ready, stop, out))
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("an ingest worker did not subscribe within 60 s")
        go, pub_ready, pub_out = ctx.Event(), ctx.Semaphore(0), ctx.Queue()
        pubs = [
            ctx.Process(
                target=_publisher,
                args=(broker, i, per, args.pool, total_rate / args.publishers, go, pub_ready, pub_out),
            )
            for i in range(args.publishers)
        ]
        for p in pubs:
            p.start()
        for _ in pubs:
            if not pub_ready.acquire(timeout=120):
                raise RuntimeError("a publisher did not start within 120 s")
        count = _count(db_url)
        t0 = time.time()
        go.set()
        samples = [(t0, 0)]
        last_change = time.monotonic()
        while True:
            time.sleep(0.2)
            stored, _ = count()
            if stored != samples[-1][1]:
                samples.append((time.time(), stored))
                last_change = time.monotonic()
            if stored >= total or time.monotonic() - last_change > 20:
                break
        published = [pub_out.get(timeout=60) for _ in pubs]
        for p in pubs:
            p.join(30)
        time.sleep(1.0)  # a late duplicate would show up now
        stored, distinct = count()
        count.engine.dispose()  # type: ignore[attr-defined]
        stop.set()
        stats = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    if not all(isinstance(s, dict) for _, s in stats):
        raise RuntimeError(f"an ingest worker failed: {stats}")
    redelivered = sum(s["duplicates"] for _, s in stats)
    pub_start = min(p[1] for p in published)
    pub_end = max(p[2] for p in published)
    done = _when(samples, total)
    if paced:  # committed while the load was offered, the first second (connections warming) aside
        rate = _between(samples, pub_start + 1.0, pub_end)
    else:
        rate = 0.8 * total / max(_when(samples, 0.9 * total) - _when(samples, 0.1 * total), 1e-9)
    shutil.rmtree(data_dir, ignore_errors=True)
    return IngestRun(
        workers=workers,
        mode=mode,
        sent=total,
        stored=stored,
        distinct=distinct,
        redelivered=redelivered,
        offered=total / (pub_end - pub_start),
        rate=rate,
        lag_s=max(0.0, done - pub_end),
        payload_kb=sum(p[3] for p in published) / total / 1024,
        cpu_us=sum(s["cpu_s"] for _, s in stats) / max(stored, 1) * 1e6,
        agent_cpu_us=sum(p[4] for p in published) / total * 1e6,
    )
