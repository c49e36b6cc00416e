"""What the hub benchmarks store and send: a fresh database per run, the results the publishers
send, and the bulk load (sites, devices, stations, classes, results, crops, reviews) the page
benchmark reads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

SITE = "bench"


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


def result_messages(index: int, count: int, pool: int) -> list[tuple[str, bytes]]:
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
