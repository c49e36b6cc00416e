"""GET /metrics: the site's health in the Prometheus text format 0.0.4, for a scraper.

Every figure comes from the database, so it is right whichever process scrapes it (the web
process and the ingest workers may be separate processes, several of them): results stored
in the last minute (the ingest rate), capture-to-store lag, the newest result's age and lag
per device, devices online / error / silent / offline, and the health each device reports in
its metrics (fps, latency, spool depth, drops, rejected frames, CPU, temperature). When the app runs in the same
process as an ingest worker (``app.extensions["hub.ingest"]``), that worker's counters and
queue depth are added.

Auth: a bearer token (``kdfleet hub add-token prometheus``, any role), as for the JSON API, or a
signed-in dashboard user. Nothing is served anonymously, from loopback either: behind a
reverse proxy on the same host every visitor would come from loopback.

The app-wide sign-in check (`auth.load_principal`) accepts tokens under /api/ only and sends
anonymous visitors to the login page, so this blueprint authenticates /metrics itself, in a
hook that runs before that check (blueprint hooks are registered first in `create_app`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import Blueprint, Response, current_app, request, session
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from hub.db.models import Device, Result, Site
from hub.services import devices, users
from hub.services.devices import STATES
from hub.services.common import now_utc
from hub.web.db import get_session

bp = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WINDOW_S = 60  # "last minute" figures: results received since now - WINDOW_S


@dataclass
class Family:
    """One metric: its name, type, help line and samples (labels, value)."""

    name: str
    type: str  # "gauge" | "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render(families: Iterable[Family]) -> str:
    """The text exposition format 0.0.4: HELP and TYPE lines, then `name{labels} value` lines."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {f.name} {f.type}")
        for labels, value in f.samples:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{f.name}{{{text}}} {_number(value)}" if text else f"{f.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _lag_seconds(db: Session) -> ColumnElement[float]:
    """received_at - ts in seconds, in SQL: capture (device clock) to commit (hub clock)."""
    if db.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Result.received_at - Result.ts)
    return (func.julianday(Result.received_at) - func.julianday(Result.ts)) * 86400.0


def collect(db: Session, now: datetime, silent_after: timedelta, ingest: object | None = None) -> list[Family]:
    """Every metric family, read from the database at `now`."""
    started = time.perf_counter()
    views = devices.list_devices(db, now=now, silent_after=silent_after)
    ids = {(s, n): i for i, s, n in db.execute(select(Device.id, Site.name, Device.name).join(Device.site))}

    since = now - timedelta(seconds=WINDOW_S)
    lag = _lag_seconds(db)
    recent = {
        device_id: (count, avg, worst)
        for device_id, count, avg, worst in db.execute(
            select(Result.device_id, func.count(), func.avg(lag), func.max(lag))
            .where(Result.received_at >= since)
            .group_by(Result.device_id)
        )
    }
    # each device's newest result by id (a ULID: capture order), one index probe per device
    newest_id = select(func.max(Result.id)).where(Result.device_id == Device.id).correlate(Device).scalar_subquery()
    newest = {
        device_id: (received_at, ts)
        for device_id, received_at, ts in db.execute(
            select(Device.id, Result.received_at, Result.ts).join(Result, Result.id == newest_id)
        )
    }

    f = {
        "devices": Family("kdfleet_devices", "gauge", "Devices by state: online, error (online, with a source "
                          "failing), silent (online but unheard for web.silent_after_s) or offline (last will "
                          "or offline status)."),
        "results": Family("kdfleet_results_last_minute", "gauge", "Results stored in the last 60 s."),
        "rate": Family("kdfleet_ingest_rate", "gauge", "Results stored per second, averaged over the last 60 s."),
        "lag": Family("kdfleet_ingest_lag_seconds", "gauge", "Capture (device clock) to storage (hub clock) "
                      "of the results stored in the last 60 s; stat is avg or max."),
        "spool": Family("kdfleet_spool_depth_total", "gauge", "Results waiting in the spools of the devices "
                        "not offline, as they last reported: the queue in front of the hub."),
        "state": Family("kdfleet_device_state", "gauge", "1 for the device's current state, 0 for the others."),
        "online": Family("kdfleet_device_online", "gauge", "1 when the device is online and heard recently "
                         "(its state online or error)."),
        "seen": Family("kdfleet_device_last_seen_age_seconds", "gauge", "Seconds since the hub last heard the device."),
        "dev_results": Family("kdfleet_device_results_last_minute", "gauge", "Results of the device stored in "
                              "the last 60 s."),
        "dev_age": Family("kdfleet_device_last_result_age_seconds", "gauge", "Seconds since the device's newest "
                          "result was stored."),
        "dev_lag": Family("kdfleet_device_last_result_lag_seconds", "gauge", "Capture to storage of the device's "
                          "newest result (includes clock skew between device and hub)."),
        "fps": Family("kdfleet_device_fps", "gauge", "Frames per second the device reported."),
        "p50": Family("kdfleet_device_latency_p50_seconds", "gauge", "Median capture-to-result latency reported."),
        "p95": Family("kdfleet_device_latency_p95_seconds", "gauge", "95th percentile latency reported."),
        "dev_spool": Family("kdfleet_device_spool_depth", "gauge", "Results in the device's spool, not yet "
                            "confirmed by the hub's receipt."),
        "dev_pending": Family("kdfleet_device_pending_receipts", "gauge", "Results the device has sent and "
                              "the hub has not yet confirmed, as last reported."),
        "frames_dropped": Family("kdfleet_device_frames_dropped", "gauge", "Frames the device dropped at "
                                 "capture, as last reported."),
        "results_dropped": Family("kdfleet_device_results_dropped", "gauge", "Results the device's full spool "
                                  "dropped, as last reported."),
        "frames_rejected": Family("kdfleet_device_frames_rejected", "gauge", "Frames or files the device's "
                                  "sources could not use (corrupt, over the size limits), as last reported."),
        "source_failing": Family("kdfleet_device_source_failing", "gauge", "1 while the device reports a "
                                 "failing source (its error is on the device page), as last reported."),
        "cpu": Family("kdfleet_device_cpu_percent", "gauge", "CPU use the device reported, percent."),
        "temp": Family("kdfleet_device_temperature_celsius", "gauge", "Temperature the device reported."),
        "gpu": Family("kdfleet_device_gpu_percent", "gauge", "GPU use the device reported, percent."),
        "infer95": Family("kdfleet_device_inference_p95_seconds", "gauge", "95th percentile inference time "
                          "per frame reported."),
        "score95": Family("kdfleet_device_scoring_p95_seconds", "gauge", "95th percentile scoring time "
                          "(score, crops, heat map) per frame reported."),
    }
    counts = dict.fromkeys(STATES, 0)
    spool_total = 0
    for v in views:
        counts[v.state] += 1
        labels = {"site": v.site, "device": v.name, "station": v.station}
        for state in STATES:
            f["state"].add(1 if v.state == state else 0, **labels, state=state)
        f["online"].add(1 if v.state in ("online", "error") else 0, **labels)
        if v.last_seen is not None:
            f["seen"].add(max(0.0, (now - v.last_seen).total_seconds()), **labels)
        device_id = ids.get((v.site, v.name))
        count, _, _ = recent.get(device_id, (0, None, None))
        f["dev_results"].add(count, **labels)
        if device_id in newest:
            received_at, ts = newest[device_id]
            f["dev_age"].add(max(0.0, (now - received_at).total_seconds()), **labels)
            f["dev_lag"].add((received_at - ts).total_seconds(), **labels)
        f["fps"].add(v.fps, **labels)
        f["p50"].add(None if v.latency_p50_ms is None else v.latency_p50_ms / 1000, **labels)
        f["p95"].add(None if v.latency_p95_ms is None else v.latency_p95_ms / 1000, **labels)
        f["dev_spool"].add(v.spool_depth, **labels)
        f["dev_pending"].add(v.pending_receipts, **labels)
        f["frames_dropped"].add(v.frames_dropped, **labels)
        f["results_dropped"].add(v.results_dropped, **labels)
        f["frames_rejected"].add(v.frames_rejected, **labels)
        if v.metrics_at is not None:
            f["source_failing"].add(1 if v.source_error else 0, **labels)
        f["cpu"].add(v.cpu_percent, **labels)
        f["temp"].add(v.temperature_c, **labels)
        f["gpu"].add(v.gpu_percent, **labels)
        f["infer95"].add(None if v.infer_p95_ms is None else v.infer_p95_ms / 1000, **labels)
        f["score95"].add(None if v.score_p95_ms is None else v.score_p95_ms / 1000, **labels)
        if v.state != "offline" and v.spool_depth is not None:
            spool_total += v.spool_depth
    for state in STATES:
        f["devices"].add(counts[state], state=state)
    total = sum(c for c, _, _ in recent.values())
    f["results"].add(total)
    f["rate"].add(total / WINDOW_S)
    if total:
        f["lag"].add(sum(c * a for c, a, _ in recent.values()) / total, stat="avg")
        f["lag"].add(max(m for _, _, m in recent.values()), stat="max")
    f["spool"].add(spool_total)
    families = list(f.values())
    if ingest is not None:
        families += _ingest_families(ingest)
    scrape = Family("kdfleet_metrics_collect_seconds", "gauge", "Time this scrape's queries took.")
    scrape.add(time.perf_counter() - started)
    return [*families, scrape]


def _ingest_families(ingest: object) -> Sequence[Family]:
    """The counters of an ingest worker running in this process (`Ingest.stats()`)."""
    stats = ingest.stats()  # type: ignore[attr-defined]
    out = []
    for name, help_text in (
        ("received", "Messages this process's ingest worker received."),
        ("stored", "New results it stored."),
        ("duplicates", "Results it received again and stored once."),
        ("malformed", "Payloads it refused as malformed."),
        ("failed", "Valid messages the database refused."),
    ):
        fam = Family(f"kdfleet_ingest_{name}_total", "counter", help_text)
        fam.add(getattr(stats, name))
        out.append(fam)
    queued = Family("kdfleet_ingest_queue_depth", "gauge", "Messages received and waiting for the writer.")
    queued.add(stats.queued)
    return [*out, queued]


@bp.get("/metrics")
def metrics() -> Response:
    silent = timedelta(seconds=current_app.config["HUB_SILENT_AFTER_S"])
    families = collect(get_session(), now_utc(), silent, current_app.extensions.get("hub.ingest"))
    return Response(render(families), content_type=CONTENT_TYPE)


@bp.before_app_request
def _serve_metrics() -> Response | None:
    """Authenticate /metrics (token or signed-in user) and serve it; other paths pass through."""
    if request.endpoint != "metrics.metrics":
        return None
    db = get_session()
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    principal = None
    if scheme.lower() == "bearer" and token.strip():
        principal = users.token_principal(db, token.strip())
        db.commit()  # the token's last use
    elif "uid" in session:
        principal = users.session_user(db, session["uid"], session.get("epoch", -1))
    if principal is None or not principal.allows("viewer"):
        return Response(
            "401 Unauthorized: send an API token as 'Authorization: Bearer <token>' "
            "(kdfleet hub add-token prometheus) or sign in\n",
            status=401,
            content_type="text/plain; charset=utf-8",
            headers={"WWW-Authenticate": 'Bearer realm="kdfleet hub"'},
        )
    return metrics()
