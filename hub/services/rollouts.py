"""Rollouts: ship one registry model to devices, canary first, then in waves, gated on health.

`decide` is the policy as a pure function of the targets' states; the
functions around it read and write the database and return the retained
`model/desired` messages the controller (hub/rollouts.py) publishes. A
rollout moves draft -> canary -> rolling -> completed; it can be paused and
resumed; it fails when `max_failures` devices fail their update or an
updated device breaks a health bound, and `abort` stops it by hand (state
rolled_back); either way `advance` then sends every device it touched back
to its previous model. `sent_version` on each target makes that idempotent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.db.models import Device, Model, Result, Rollout, RolloutTarget, Site, utcnow
from hub.services.common import NotFound, QueryError
from shared import messages
from shared.ids import new_ulid

LIVE = ("canary", "rolling")  # rollouts the controller advances
# an update in flight on the device: the agent's own states, as its model/state messages name them
UPDATING = ("desired", "downloading", "verifying", "building", "testing")
MAX_REASON = 1000  # characters of a target's reason kept
MIN_RESULTS_FOR_RATE = 20  # results an updated device must have sent before its anomaly rate counts


@dataclass(frozen=True, slots=True)
class Policy:
    """How a rollout proceeds; `canary` is a device count or a percentage such as "10%"."""

    canary: int | str = 1
    wave_size: int = 0  # devices per wave after the canary; 0: all the rest at once
    soak_s: float = 60.0  # how long a wave must run healthy before the next one starts
    max_failures: int = 1  # failed device updates that stop the rollout
    max_anomaly_rate: float | None = None  # an updated device above this anomaly rate stops it
    max_latency_ms: float | None = None  # an updated device above this p95 latency stops it

    def canary_count(self, devices: int) -> int:
        if isinstance(self.canary, str) and self.canary.endswith("%"):
            try:
                share = float(self.canary[:-1])
            except ValueError:
                raise QueryError(f"canary {self.canary!r}: give a count (2) or a percentage (10%)") from None
            if not 0 < share <= 100:
                raise QueryError(f"canary {self.canary!r}: the percentage must be in (0, 100]")
            return max(1, math.ceil(devices * share / 100))
        try:
            count = int(self.canary)
        except ValueError:
            raise QueryError(f"canary {self.canary!r}: give a count (2) or a percentage (10%)") from None
        if count < 1:
            raise QueryError("canary: at least one device goes first")
        return min(count, devices)

    def check(self) -> None:
        if self.wave_size < 0 or self.soak_s < 0 or self.max_failures < 1:
            raise QueryError("rollout policy: wave_size >= 0, soak_s >= 0 and max_failures >= 1 are required")
        if self.max_anomaly_rate is not None and not 0 <= self.max_anomaly_rate <= 1:
            raise QueryError("rollout policy: max_anomaly_rate is a fraction between 0 and 1")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise QueryError("rollout policy: max_latency_ms must be positive")


# -- the policy, pure ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetStatus:
    key: int
    device: str
    wave: int
    state: str
    active_for_s: float | None = None  # since the device reported the new model active
    anomaly_rate: float | None = None  # on the new model; None until enough results
    latency_ms: float | None = None  # p95 reported after the update


@dataclass(frozen=True, slots=True)
class Decision:
    state: str  # the rollout's next state
    send: tuple[int, ...] = ()  # targets to tell about the new model now
    note: str = ""


def decide(state: str, policy: Policy, targets: Sequence[TargetStatus]) -> Decision:
    """The next step of a live rollout: stop it, send the next wave, wait, or finish."""
    if state not in LIVE:
        return Decision(state)
    failed = [t for t in targets if t.state in ("failed", "rolled_back")]
    if len(failed) >= policy.max_failures:
        names = ", ".join(t.device for t in failed[:5])
        return Decision("failed", note=f"{len(failed)} device update(s) failed ({names}); "
                                       f"the limit is {policy.max_failures}")
    for t in targets:
        if t.state != "active":
            continue
        if policy.max_anomaly_rate is not None and t.anomaly_rate is not None \
                and t.anomaly_rate > policy.max_anomaly_rate:
            return Decision("failed",
                            note=f"{t.device}: anomaly rate {t.anomaly_rate:.1%} on the new model is above "
                                 f"the bound {policy.max_anomaly_rate:.1%}")
        if policy.max_latency_ms is not None and t.latency_ms is not None and t.latency_ms > policy.max_latency_ms:
            return Decision("failed",
                            note=f"{t.device}: p95 latency {t.latency_ms:.1f} ms on the new model is above "
                                 f"the bound {policy.max_latency_ms:.1f} ms")
    for wave in sorted({t.wave for t in targets}):
        members = [t for t in targets if t.wave == wave]
        phase = "canary" if wave == 0 else "rolling"
        pending = tuple(t.key for t in members if t.state == "pending")
        if pending:
            what = "canary" if wave == 0 else f"wave {wave}"
            return Decision(phase, send=pending, note=f"{what}: {len(pending)} device(s) updating")
        if any(t.state in UPDATING for t in members):
            return Decision(phase)
        active = [t for t in members if t.state == "active"]
        soaked = min((t.active_for_s or 0.0 for t in active), default=policy.soak_s)
        if soaked < policy.soak_s:
            return Decision(phase)
    return Decision("completed", note=f"{len(targets)} device(s) updated")


# -- the database ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A retained `model/desired` message for one device."""

    site: str
    device: str
    desired: messages.ModelDesired


@dataclass(frozen=True, slots=True)
class TargetView:
    device: str
    site: str
    wave: int
    state: str
    reason: str
    previous: str  # "model version" the device ran before
    desired_at: datetime | None
    active_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RolloutDetail:
    id: str
    model_id: int
    model: str
    version: str
    state: str
    note: str
    policy: Policy
    targets: list[TargetView]
    created_at: datetime
    updated_at: datetime

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.state] = out.get(t.state, 0) + 1
        return out


def start_rollout(session: Session, model_id: int, policy: Policy, *, site: str | None = None,
                  devices: Sequence[str] | None = None, note: str = "", user_id: int | None = None) -> str:
    """Create a live rollout of a registry model; returns its id. Devices already on it are left out."""
    policy.check()
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"no model {model_id} in the registry; upload it first (POST /api/models)")
    query = select(Device, Site.name).join(Site, Device.site_id == Site.id).order_by(Site.name, Device.name)
    site_row = None
    if site is not None:
        site_row = session.scalar(select(Site).where(Site.name == site))
        if site_row is None:
            raise NotFound(f"no site {site!r}; devices appear once they have connected")
        query = query.where(Device.site_id == site_row.id)
    rows = list(session.execute(query))
    if devices:
        wanted = set(devices)
        rows = [(d, s) for d, s in rows if d.name in wanted]
        unknown = wanted - {d.name for d, _ in rows}
        if unknown:
            raise NotFound(f"unknown device(s) {', '.join(sorted(unknown))}" + (f" at site {site!r}" if site else ""))
    busy = set(session.scalars(
        select(RolloutTarget.device_id).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .where(Rollout.state.in_((*LIVE, "paused")))))
    rows = [(d, s) for d, s in rows if (d.model_id, d.model_version) != (model.name, model.version)]
    clash = [d.name for d, _ in rows if d.id in busy]
    if clash:
        raise QueryError(f"device(s) {', '.join(clash[:5])} are in another live rollout; finish or abort it first")
    if not rows:
        raise QueryError(f"no device to update: every targeted device already runs {model.name} {model.version}")
    canary = policy.canary_count(len(rows))
    rollout = Rollout(id=new_ulid(), model_id=model.id, site_id=site_row.id if site_row else None, state="canary",
                      canary_devices=canary, note=note, created_by_id=user_id, wave_size=policy.wave_size,
                      soak_s=policy.soak_s, max_failures=policy.max_failures,
                      max_anomaly_rate=policy.max_anomaly_rate, max_latency_ms=policy.max_latency_ms)
    session.add(rollout)
    rest = len(rows) - canary
    size = policy.wave_size or max(rest, 1)
    for i, (device, _) in enumerate(rows):
        wave = 0 if i < canary else 1 + (i - canary) // size
        session.add(RolloutTarget(rollout_id=rollout.id, device_id=device.id, wave=wave,
                                  previous_model=device.model_id, previous_version=device.model_version))
    session.flush()
    return rollout.id


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return rollout


def _policy(r: Rollout) -> Policy:
    return Policy(r.canary_devices, r.wave_size, r.soak_s, r.max_failures, r.max_anomaly_rate, r.max_latency_ms)


def pause(session: Session, rollout_id: str, note: str = "") -> None:
    """Stop sending new waves; updates already under way finish."""
    r = _rollout(session, rollout_id)
    if r.state not in LIVE:
        raise QueryError(f"rollout {rollout_id} is {r.state}; only a canary or rolling rollout can be paused")
    r.paused_from, r.state, r.updated_at = r.state, "paused", utcnow()
    r.note = note or "paused by hand"


def resume(session: Session, rollout_id: str, note: str = "") -> None:
    r = _rollout(session, rollout_id)
    if r.state != "paused":
        raise QueryError(f"rollout {rollout_id} is {r.state}, not paused")
    r.state, r.paused_from, r.updated_at = r.paused_from or "canary", None, utcnow()
    r.note = note or "resumed"


def abort(session: Session, rollout_id: str, note: str = "") -> None:
    """Stop the rollout; the controller then sends every device it touched back to its previous model."""
    r = _rollout(session, rollout_id)
    if r.state not in (*LIVE, "paused"):
        raise QueryError(f"rollout {rollout_id} is {r.state}; there is nothing to abort")
    r.state, r.note, r.updated_at = "rolled_back", note or "aborted by hand", utcnow()


def _send_back(session: Session, now: datetime) -> list[Outgoing]:
    """Desired-model messages that return the devices of stopped rollouts to their previous models."""
    out = []
    rows = session.execute(
        select(RolloutTarget, Device.name, Site.name).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .join(Device, RolloutTarget.device_id == Device.id).join(Site, Device.site_id == Site.id)
        .where(Rollout.state.in_(("failed", "rolled_back")), RolloutTarget.state != "pending",
               RolloutTarget.sent_version != RolloutTarget.previous_version))
    for target, device, site in rows:
        previous = session.scalar(select(Model).where(Model.name == target.previous_model,
                                                      Model.version == target.previous_version))
        if previous is None:
            note = (f"not sent back: its previous model {target.previous_model} {target.previous_version} "
                    "is not in the registry; the agent keeps its last good model")
        else:
            out.append(Outgoing(site, device, messages.ModelDesired(
                previous.name, previous.version, previous.url, previous.sha256, rollout_id=target.rollout_id)))
            note = f"sent back to {previous.name} {previous.version}"
        target.reason = _add_reason(target.reason, note)
        target.sent_version, target.updated_at = target.previous_version, now
    return out


def _add_reason(before: str, now: str) -> str:
    """The story of a target so far: why it failed, then what was done about it."""
    return (f"{before}; {now}" if before else now)[-MAX_REASON:]


def record_state(session: Session, site: str, device: str, msg: messages.ModelState) -> bool:
    """Apply a device's `model/state` report to its rollout target; False when it matches none."""
    if not msg.rollout_id:
        return False
    target = session.scalar(
        select(RolloutTarget).join(Device, RolloutTarget.device_id == Device.id)
        .join(Site, Device.site_id == Site.id)
        .where(RolloutTarget.rollout_id == msg.rollout_id, Device.name == device, Site.name == site))
    if target is None or target.state == "pending":
        return False
    rollout = session.get(Rollout, msg.rollout_id)
    model = session.get(Model, rollout.model_id) if rollout else None
    now = utcnow()
    if model is not None and msg.version and msg.version != model.version:
        # a report about the model the device goes back to: the update itself stays as it ended
        if msg.state == "active":
            target.state = "rolled_back"
            target.reason = _add_reason(target.reason, f"back on {msg.model_id} {msg.version}")
        target.updated_at = now
        return True
    target.state = "desired" if msg.state == "idle" else msg.state
    target.reason = msg.reason[:MAX_REASON]
    target.updated_at = now
    if msg.state == "active" and target.active_at is None:
        target.active_at = now
    return True


def advance(session: Session, now: datetime | None = None) -> list[Outgoing]:
    """Move every live rollout one step; returns the desired-model messages to publish."""
    now = now or utcnow()
    out: list[Outgoing] = []
    for r in session.scalars(select(Rollout).where(Rollout.state.in_(LIVE)).order_by(Rollout.created_at)):
        model = session.get(Model, r.model_id)
        rows = list(session.execute(
            select(RolloutTarget, Device, Site.name).join(Device, RolloutTarget.device_id == Device.id)
            .join(Site, Device.site_id == Site.id).where(RolloutTarget.rollout_id == r.id)
            .order_by(RolloutTarget.wave, RolloutTarget.id)))
        statuses = [_status(session, t, d, model, now) for t, d, _ in rows]
        decision = decide(r.state, _policy(r), statuses)
        send = set(decision.send)
        for target, device, site in rows:
            if target.id in send:
                target.state, target.desired_at, target.updated_at = "desired", now, now
                target.sent_version = model.version
                out.append(Outgoing(site, device.name, messages.ModelDesired(
                    model.name, model.version, model.url, model.sha256, rollout_id=r.id)))
        if decision.state != r.state or decision.note:
            r.state, r.updated_at = decision.state, now
            r.note = decision.note or r.note
    session.flush()
    out += _send_back(session, now)
    return out


def _status(session: Session, t: RolloutTarget, d: Device, model: Model, now: datetime) -> TargetStatus:
    active_for = rate = latency = None
    if t.state == "active" and t.active_at is not None:
        active_for = (now - t.active_at).total_seconds()
        total, anomalies = session.execute(
            select(func.count(), func.count().filter(Result.verdict == "anomaly"))
            .where(Result.device_id == d.id, Result.model_version == model.version,
                   Result.received_at >= t.active_at)).one()
        rate = anomalies / total if total >= MIN_RESULTS_FOR_RATE else None
        if d.metrics_at is not None and d.metrics_at >= t.active_at:
            latency = d.latency_p95_ms
    return TargetStatus(t.id, d.name, t.wave, t.state, active_for, rate, latency)


def rollout_detail(session: Session, rollout_id: str) -> RolloutDetail:
    r = _rollout(session, rollout_id)
    model = session.get(Model, r.model_id)
    rows = session.execute(
        select(RolloutTarget, Device.name, Site.name).join(Device, RolloutTarget.device_id == Device.id)
        .join(Site, Device.site_id == Site.id).where(RolloutTarget.rollout_id == r.id)
        .order_by(RolloutTarget.wave, Site.name, Device.name))
    targets = [TargetView(device, site, t.wave, t.state, t.reason,
                          f"{t.previous_model} {t.previous_version}".strip(), t.desired_at, t.active_at,
                          t.updated_at) for t, device, site in rows]
    return RolloutDetail(r.id, r.model_id, model.name, model.version, r.state, r.note, _policy(r), targets,
                         r.created_at, r.updated_at)
