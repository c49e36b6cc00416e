"""Devices: the fleet with each device's state, one device's page, and MQTT provisioning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from hub.db.models import Device, ProductClass, Result, Site, Station
from hub.services.common import NotFound, QueryError, insert_ignoring_duplicates, now_utc, ulid_floor
from shared import topics

SILENT_AFTER = timedelta(seconds=120)  # online but unheard for this long: shown as "silent"
STATES = ("online", "error", "silent", "offline")  # "error": online, heard, and a source failing


@dataclass(frozen=True, slots=True)
class DeviceView:
    site: str
    name: str
    station: str
    state: str  # STATES
    last_seen: datetime | None
    model_id: str
    model_version: str
    runtime: str
    hardware: str
    agent_version: str
    fps: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    spool_depth: int | None  # results not yet confirmed by the hub's receipt
    pending_receipts: int | None  # of those, sent and awaiting the receipt
    frames_dropped: int | None
    results_dropped: int | None
    cpu_percent: float | None
    temperature_c: float | None
    infer_p95_ms: float | None
    score_p95_ms: float | None
    gpu_percent: float | None
    frames_rejected: int | None
    source_error: str  # why a source is failing, as the device last reported; "" when none is
    metrics_at: datetime | None
    status_at: datetime | None
    provisioned: bool  # has MQTT credentials from `kdfleet hub add-device`

    @property
    def online(self) -> bool:
        return self.state != "offline"


@dataclass(frozen=True, slots=True)
class FleetSummary:
    devices: int
    online: int
    error: int
    silent: int
    offline: int
    results_last_hour: int
    anomalies_last_hour: int

    @property
    def anomaly_rate(self) -> float | None:
        return self.anomalies_last_hour / self.results_last_hour if self.results_last_hour else None


@dataclass(frozen=True, slots=True)
class DeviceActivity:
    """What one device produced lately."""

    results_last_hour: int
    anomalies_last_hour: int
    results_last_day: int
    anomalies_last_day: int
    classes: list[str]


@dataclass(frozen=True, slots=True)
class MqttAccount:
    """A device's broker account, as the password file and the ACL need it."""

    site: str
    device: str
    username: str
    password_hash: str


def connection_state(device: Device, now: datetime, silent_after: timedelta = SILENT_AFTER) -> str:
    """online, silent (online but unheard for `silent_after`) or offline, as the fleet page shows it."""
    return _state(device, now, silent_after)


def _state(device: Device, now: datetime, silent_after: timedelta) -> str:
    if not device.online:
        return "offline"
    if device.last_seen is None or now - device.last_seen > silent_after:
        return "silent"
    return "error" if device.source_error else "online"


def _view(site: str, station: str | None, d: Device, now: datetime, silent: timedelta) -> DeviceView:
    return DeviceView(
        site=site,
        name=d.name,
        station=station or "",
        state=_state(d, now, silent),
        last_seen=d.last_seen,
        model_id=d.model_id,
        model_version=d.model_version,
        runtime=d.runtime,
        hardware=d.hardware,
        agent_version=d.agent_version,
        fps=d.fps,
        latency_p50_ms=d.latency_p50_ms,
        latency_p95_ms=d.latency_p95_ms,
        spool_depth=d.spool_depth,
        pending_receipts=d.pending_receipts,
        frames_dropped=d.frames_dropped,
        results_dropped=d.results_dropped,
        cpu_percent=d.cpu_percent,
        temperature_c=d.temperature_c,
        infer_p95_ms=d.infer_p95_ms,
        score_p95_ms=d.score_p95_ms,
        gpu_percent=d.gpu_percent,
        frames_rejected=d.frames_rejected,
        source_error=d.source_error or "",
        metrics_at=d.metrics_at,
        status_at=d.status_at,
        provisioned=d.mqtt_password_hash is not None,
    )


def _devices_query() -> tuple[object, type[Station]]:
    station = aliased(Station)
    stmt = (
        select(Site.name, station.name, Device)
        .join(Device.site)
        .outerjoin(station, Device.station_id == station.id)
    )
    return stmt, station


def list_devices(
    session: Session,
    *,
    site: str | None = None,
    model: tuple[str, str | None] | None = None,
    now: datetime | None = None,
    silent_after: timedelta = SILENT_AFTER,
) -> list[DeviceView]:
    """Every device (of one site; running one model, (name, version) or (name, None) for any of its
    versions, if given), sorted by site and name, with its online state."""
    now = now or now_utc()
    stmt, _ = _devices_query()
    stmt = stmt.order_by(Site.name, Device.name)
    if site:
        stmt = stmt.where(Site.name == site)
    if model:
        stmt = stmt.where(Device.model_id == model[0])
        if model[1] is not None:
            stmt = stmt.where(Device.model_version == model[1])
    return [_view(s, st, d, now, silent_after) for s, st, d in session.execute(stmt)]


def device_detail(
    session: Session,
    site: str,
    name: str,
    *,
    now: datetime | None = None,
    silent_after: timedelta = SILENT_AFTER,
) -> DeviceView | None:
    """One device, or None when the hub has never heard of it."""
    stmt, _ = _devices_query()
    row = session.execute(stmt.where(Site.name == site, Device.name == name)).one_or_none()
    return _view(*row, now or now_utc(), silent_after) if row else None


def device_activity(
    session: Session, site: str, name: str, *, now: datetime | None = None
) -> DeviceActivity:
    """Result and anomaly counts of one device over the last hour and day."""
    now = now or now_utc()
    device_id = session.scalar(
        select(Device.id).join(Device.site).where(Site.name == site, Device.name == name)
    )
    if device_id is None:
        raise NotFound(f"no device {name!r} at site {site!r}")
    day = now - timedelta(days=1)
    hour = now - timedelta(hours=1)
    anomaly = Result.verdict == "anomaly"
    recent = Result.ts >= hour
    # one pass over the device's last day; the id bound lets the (device_id, id) index serve it
    rows = session.execute(
        select(
            Result.class_id,
            func.count().filter(recent),
            func.count().filter(recent, anomaly),
            func.count(),
            func.count().filter(anomaly),
        )
        .where(Result.device_id == device_id, Result.id >= ulid_floor(day), Result.ts >= day)
        .group_by(Result.class_id)
    ).all()
    names = dict(
        session.execute(
            select(ProductClass.id, ProductClass.name).where(
                ProductClass.id.in_([r[0] for r in rows] or [-1])
            )
        ).all()
    )
    return DeviceActivity(
        results_last_hour=sum(r[1] for r in rows),
        anomalies_last_hour=sum(r[2] for r in rows),
        results_last_day=sum(r[3] for r in rows),
        anomalies_last_day=sum(r[4] for r in rows),
        classes=sorted(names[r[0]] for r in rows),
    )


def fleet_summary(
    session: Session, *, now: datetime | None = None, silent_after: timedelta = SILENT_AFTER
) -> FleetSummary:
    """Device counts by state and the last hour's results and anomalies."""
    now = now or now_utc()
    states = [d.state for d in list_devices(session, now=now, silent_after=silent_after)]
    hour_ago = now - timedelta(hours=1)
    total, anomalies = session.execute(
        select(func.count(), func.count().filter(Result.verdict == "anomaly")).where(
            Result.ts >= hour_ago
        )
    ).one()
    return FleetSummary(
        devices=len(states),
        online=states.count("online"),
        error=states.count("error"),
        silent=states.count("silent"),
        offline=states.count("offline"),
        results_last_hour=total,
        anomalies_last_hour=anomalies,
    )


def check_database(session: Session) -> None:
    """Raise if the database does not answer (for health checks)."""
    session.execute(select(1))


def site_names(session: Session) -> list[str]:
    return list(session.scalars(select(Site.name).order_by(Site.name)))


def station_names(session: Session, site: str | None = None) -> list[str]:
    """Station names (of one site, if given), sorted, each once."""
    stmt = select(Station.name).distinct().order_by(Station.name)
    if site:
        stmt = stmt.join(Station.site).where(Site.name == site)
    return list(session.scalars(stmt))


def class_names(session: Session) -> list[str]:
    return list(session.scalars(select(ProductClass.name).order_by(ProductClass.name)))


# -- provisioning --------------------------------------------------------------------


def mqtt_username(site: str, device: str) -> str:
    """The broker user name of a device: ``device@site`` ('@' is in no site or device name)."""
    return f"{topics.check_name(device, 'device')}@{topics.check_name(site, 'site')}"


def provision(
    session: Session, site: str, device: str, password_hash: str, *, replace: bool = False
) -> MqttAccount:
    """Give a device (created if new) broker credentials; the caller commits.

    Refuses a device that has credentials already unless `replace` (a new password).
    """
    try:
        topics.check_name(site, "site")
        topics.check_name(device, "device")
    except topics.TopicError as exc:
        raise QueryError(str(exc)) from None
    session.execute(insert_ignoring_duplicates(session, Site), [{"name": site}])
    site_id = session.scalar(select(Site.id).where(Site.name == site))
    session.execute(
        insert_ignoring_duplicates(session, Device), [{"site_id": site_id, "name": device}]
    )
    row = session.scalar(select(Device).where(Device.site_id == site_id, Device.name == device))
    assert row is not None
    if row.mqtt_password_hash is not None and not replace:
        raise QueryError(
            f"device {device!r} at site {site!r} has credentials already; "
            "give it a new password with --new-password, or revoke it first"
        )
    row.mqtt_username = mqtt_username(site, device)
    row.mqtt_password_hash = password_hash
    row.provisioned_at = now_utc()
    return MqttAccount(site, device, row.mqtt_username, password_hash)


def revoke(session: Session, site: str, device: str) -> None:
    """Take a device's broker credentials away (its rows and results stay); the caller commits."""
    row = session.scalar(
        select(Device).join(Device.site).where(Site.name == site, Device.name == device)
    )
    if row is None or row.mqtt_password_hash is None:
        raise NotFound(f"device {device!r} at site {site!r} has no broker credentials")
    row.mqtt_username = row.mqtt_password_hash = row.provisioned_at = None


def mqtt_accounts(session: Session) -> list[MqttAccount]:
    """Every provisioned device's broker account, sorted by site and device."""
    rows = session.execute(
        select(Site.name, Device.name, Device.mqtt_username, Device.mqtt_password_hash)
        .join(Device.site)
        .where(Device.mqtt_password_hash.is_not(None))
        .order_by(Site.name, Device.name)
    )
    return [MqttAccount(*row) for row in rows]
