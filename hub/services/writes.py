"""The database writes of ingest: a batch of validated messages in one transaction.

`hub.ingest` takes messages off MQTT, validates them and hands batches here;
tests and imports use `BatchWriter` without MQTT. Results are keyed by their
ULID and inserted with ON CONFLICT DO NOTHING, so a result sent twice is
stored once; status and metrics messages update the device row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from hub.db.models import Crop, Device, ProductClass, Result, Site, Station, from_unix
from hub.db.session import Database
from hub.services.common import insert_ignoring_duplicates
from hub.store import Images
from shared import messages

LAST_SEEN_EVERY_S = 1.0  # a device's last_seen from its results is written at most this often


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated message with where it came from and when the hub received it."""

    site: str
    device: str
    message: messages.Result | messages.Status | messages.Metrics
    received_at: datetime


@dataclass(frozen=True, slots=True)
class WriteReport:
    stored: int
    duplicates: int
    updates: int


def bulk_insert(
    session: Session, model: type, rows: list[dict[str, Any]], returning: str | None = None
) -> list[Any]:
    """INSERT rows, skipping those whose key exists; returns the `returning` column of new ones.

    PostgreSQL gets one short statement with one array per column (``INSERT ... SELECT
    FROM unnest(...)``): a multi-row VALUES list would cost the driver more to build than
    the server to run. SQLite gets an ordinary executemany.
    """
    table = model.__table__  # type: ignore[attr-defined]
    if session.get_bind().dialect.name != "postgresql":
        stmt = insert_ignoring_duplicates(session, model)
        if returning is None:
            session.execute(stmt, rows)
            return []
        return list(session.scalars(stmt.returning(table.c[returning]), rows))
    columns = [c for c in table.columns if c.name in rows[0]]
    arrays = ", ".join(f"CAST(:{c.name} AS {_pg_type(c)}[])" for c in columns)
    sql = (
        f"INSERT INTO {table.name} ({', '.join(c.name for c in columns)}) "
        f"SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING"
    )
    params = {c.name: [r[c.name] for r in rows] for c in columns}
    if returning is None:
        session.execute(text(sql), params)
        return []
    return list(session.scalars(text(f"{sql} RETURNING {returning}"), params))


def _pg_type(column: Any) -> str:
    from sqlalchemy.dialects import postgresql

    return column.type.compile(dialect=postgresql.dialect())


class BatchWriter:
    """Stores batches of validated messages; usable without MQTT (tests, imports).

    The ids of sites, devices, stations and classes are remembered once known (rows of
    those tables are never deleted), so a batch from known devices costs the database one
    INSERT of results (and one of crops) and its commit. A device's `last_seen` is written
    at most every LAST_SEEN_EVERY_S from its results; status and metrics always write it.
    """

    def __init__(self, db: Database, store: Images) -> None:
        self.db = db
        self.store = store
        self._sites: dict[str, int] = {}
        self._devices: dict[tuple[str, str], int] = {}
        self._stations: dict[tuple[str, str], int] = {}
        self._classes: dict[str, int] = {}
        self._seen_written: dict[int, float] = {}  # device id -> monotonic time of the last write
        self._with_images = True

    def write(self, batch: Sequence[Envelope], *, images: bool = True) -> WriteReport:
        """Store one batch in one transaction; its images go to the store (and to disk) first.

        With ``images=False`` the results are stored without their images (the image store is down
        and the settings say not to wait for it: images.when_down = "without_images").
        """
        self._with_images = images
        results: dict[str, Envelope] = {}
        for env in batch:
            if isinstance(env.message, messages.Result):
                results.setdefault(env.message.id, env)
        sent = sum(isinstance(e.message, messages.Result) for e in batch)
        in_batch_duplicates = sent - len(results)
        rows, crops = self._result_rows(results.values())
        if rows:
            self.store.sync()  # the images are on disk before any row names them
        devices, stations = {(e.site, e.device) for e in batch}, _stations(batch)
        classes = {r["cls"] for r in rows}
        with self.db.transaction() as session:
            new_sites = _ensure_sites(
                session, {s for s, _ in devices | stations} - self._sites.keys()
            )
            site_ids = self._sites | new_sites
            new_devices = self._ensure_site_rows(session, Device, site_ids, devices - self._devices.keys())
            new_stations = self._ensure_site_rows(session, Station, site_ids, stations - self._stations.keys())
            new_classes = self._ensure_classes(session, classes - self._classes.keys())
            device_ids = self._devices | new_devices
            station_ids = self._stations | new_stations
            class_ids = self._classes | new_classes
            for row in rows:
                site, device = row.pop("site"), row.pop("device")
                row["device_id"] = device_ids[site, device]
                row["station_id"] = station_ids[site, row.pop("station")]
                row["class_id"] = class_ids[row.pop("cls")]
            inserted = set(bulk_insert(session, Result, rows, returning="id")) if rows else set()
            new_crops = [c for c in crops if c["result_id"] in inserted]
            if new_crops:
                bulk_insert(session, Crop, new_crops)
            updates = self._update_devices(session, batch, device_ids, station_ids)
        # remembered only once committed: a rolled-back transaction created nothing
        self._sites.update(new_sites)
        self._devices.update(new_devices)
        self._stations.update(new_stations)
        self._classes.update(new_classes)
        return WriteReport(
            stored=len(inserted),
            duplicates=len(rows) - len(inserted) + in_batch_duplicates,
            updates=updates,
        )

    def _put(self, data: bytes) -> str | None:
        return self.store.put(data, sync=False) if data and self._with_images else None

    def _result_rows(self, envelopes: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows, crops = [], []
        for env in envelopes:
            r: messages.Result = env.message
            rows.append(
                {
                    "site": env.site,
                    "device": env.device,
                    "station": r.station,
                    "cls": r.cls,
                    "id": r.id,
                    "ts": from_unix(r.ts),
                    "model_version": r.model_version,
                    "score": r.score,
                    "norm_score": r.norm_score,
                    "threshold": r.threshold,
                    "verdict": r.verdict,
                    "latency_ms": r.latency_ms,
                    "heatmap_sha": self._put(r.heatmap),
                    "thumbnail_sha": self._put(r.thumbnail),
                    "frame_sha": self._put(r.frame),
                    "source": r.source,
                    "received_at": env.received_at,
                }
            )
            crops += [
                {
                    "result_id": r.id,
                    "idx": i,
                    "x": c.x,
                    "y": c.y,
                    "w": c.w,
                    "h": c.h,
                    "score": c.score,
                    "image_sha": self._put(c.jpeg),
                }
                for i, c in enumerate(r.crops)
            ]
        return rows, crops

    @staticmethod
    def _ensure_site_rows(
        session: Session, model: type[Device] | type[Station], site_ids: dict[str, int],
        pairs: set[tuple[str, str]],
    ) -> dict[tuple[str, str], int]:
        """Ids of (site, name) pairs of devices or stations, creating the rows the hub has not seen before."""
        if not pairs:
            return {}
        # sorted, so that concurrent writers lock rows in the same order
        session.execute(
            insert_ignoring_duplicates(session, model),
            [{"site_id": site_ids[s], "name": n} for s, n in sorted(pairs)],
        )
        found = session.execute(
            select(Site.name, model.name, model.id)
            .join(Site, model.site_id == Site.id)
            .where(model.site_id.in_(site_ids.values()), model.name.in_({n for _, n in pairs}))
        )
        return {(s, n): i for s, n, i in found if (s, n) in pairs}

    @staticmethod
    def _ensure_classes(session: Session, names: set[str]) -> dict[str, int]:
        if not names:
            return {}
        session.execute(
            insert_ignoring_duplicates(session, ProductClass), [{"name": n} for n in sorted(names)]
        )
        found = session.execute(
            select(ProductClass.name, ProductClass.id).where(ProductClass.name.in_(names))
        )
        return dict(found.all())

    def _update_devices(
        self,
        session: Session,
        batch: Sequence[Envelope],
        device_ids: dict[tuple[str, str], int],
        station_ids: dict[tuple[str, str], int],
    ) -> int:
        values: dict[int, dict[str, Any]] = {}
        updates = 0
        for env in batch:  # arrival order: a later status wins over an earlier one
            did = device_ids[env.site, env.device]
            row = values.setdefault(did, {})
            msg = env.message
            if isinstance(msg, messages.Status):
                updates += 1
                row["online"] = msg.online
                if msg.online:  # a last will carries no news beyond "offline"
                    row.update(
                        status_at=from_unix(msg.ts),
                        agent_version=msg.version,
                        model_id=msg.model_id,
                        model_version=msg.model_version,
                        runtime=msg.runtime,
                        hardware=msg.hardware,
                        last_seen=env.received_at,
                    )
                    if msg.station:
                        row["station_id"] = station_ids[env.site, msg.station]
            elif isinstance(msg, messages.Metrics):
                updates += 1
                row.update(
                    metrics_at=from_unix(msg.ts),
                    fps=msg.fps,
                    latency_p50_ms=msg.latency_p50_ms,
                    latency_p95_ms=msg.latency_p95_ms,
                    frames_dropped=msg.frames_dropped,
                    results_dropped=msg.results_dropped,
                    spool_depth=msg.spool_depth,
                    pending_receipts=msg.pending_receipts if msg.pending_receipts >= 0 else None,
                    cpu_percent=msg.cpu_percent if msg.cpu_percent >= 0 else None,
                    temperature_c=None if msg.temperature_c == -1.0 else msg.temperature_c,
                    infer_p95_ms=msg.infer_p95_ms if msg.infer_p95_ms >= 0 else None,
                    score_p95_ms=msg.score_p95_ms if msg.score_p95_ms >= 0 else None,
                    gpu_percent=msg.gpu_percent if msg.gpu_percent >= 0 else None,
                    frames_rejected=msg.frames_rejected,
                    source_error=msg.source_error,
                    last_seen=env.received_at,
                )
            else:
                row["last_seen"] = env.received_at
        now = time.monotonic()
        for did in sorted(values):
            row = values[did]
            if row.keys() == {"last_seen"} and now - self._seen_written.get(did, -1e9) < LAST_SEEN_EVERY_S:
                continue  # results only, and written a moment ago
            session.execute(update(Device).where(Device.id == did).values(**row))
            self._seen_written[did] = now
        return updates


def _stations(batch: Sequence[Envelope]) -> set[tuple[str, str]]:
    """(site, station) of every result and every birth message naming one."""
    out = set()
    for env in batch:
        msg = env.message
        if isinstance(msg, messages.Result) or (isinstance(msg, messages.Status) and msg.station):
            out.add((env.site, msg.station))
    return out


def _ensure_sites(session: Session, names: set[str]) -> dict[str, int]:
    """Ids of the named sites, creating those the hub has not seen before."""
    if not names:
        return {}
    site_names = sorted(names)  # sorted, so that concurrent writers lock rows in the same order
    session.execute(insert_ignoring_duplicates(session, Site), [{"name": s} for s in site_names])
    found = session.execute(select(Site.name, Site.id).where(Site.name.in_(site_names)))
    return dict(found.all())
