"""Rollouts: ship one registry model to devices, canary first, then in waves, gated on health.

`decide` is the policy as a pure function of the targets' states; the
functions around it read and write the database and return the retained
`model/desired` messages the controller (hub/rollouts.py) publishes. A
rollout moves canary -> rolling -> completed (or waits as queued while its
devices are busy in another rollout); it can be paused and resumed (devices
still updating are told again); it fails when `max_failures` devices fail
their update, an updated device breaks a health bound, or a device online
does not finish within `wave_timeout_s`, and `abort` stops it by hand (state
rolled_back); either way `advance` then sends every device it touched back
to its previous model. `sent_version` on each target makes that idempotent.
A device offline when its wave times out is left behind (state offline):
the wave goes on without it, and `resend` tells it again when it reconnects.

One module past the usual length: the policy, the transitions it drives and
the read views of a rollout are one state machine, read together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.db.models import (
    ROLLOUT_CANARY,
    ROLLOUT_COMPLETED,
    ROLLOUT_FAILED,
    ROLLOUT_PAUSED,
    ROLLOUT_QUEUED,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_ROLLING,
    TARGET_DESIRED,
    TARGET_OFFLINE,
    TARGET_PENDING,
    TARGET_TIMED_OUT,
    Device,
    Model,
    Result,
    Rollout,
    RolloutTarget,
    Site,
    utcnow,
)
from hub.services.common import NotFound, QueryError
from hub.services.devices import SILENT_AFTER, connection_state
from shared import messages
from shared.ids import new_ulid
from shared.vocabulary import MODEL_ACTIVE, MODEL_FAILED, MODEL_IDLE, MODEL_ROLLED_BACK, MODEL_UPDATING

LIVE = (ROLLOUT_CANARY, ROLLOUT_ROLLING)  # rollouts the controller advances
BUSY = (*LIVE, ROLLOUT_PAUSED)  # rollouts whose devices no other rollout may take
STOPPED = (ROLLOUT_FAILED, ROLLOUT_ROLLED_BACK)  # rollouts that send the devices they told back
PAUSABLE = LIVE
ABORTABLE = (*BUSY, ROLLOUT_QUEUED)
# an update in flight on the device: the agent's own states, as its model/state messages name them
UPDATING = (TARGET_DESIRED, *MODEL_UPDATING)
FAILED = (MODEL_FAILED, MODEL_ROLLED_BACK, TARGET_TIMED_OUT)  # target states that count against max_failures
MAX_REASON = 1000  # characters of a target's reason kept
MIN_RESULTS_FOR_RATE = 20  # results an updated device must have sent before its anomaly rate counts
BASELINE_RESULTS = 200  # results before the update its anomaly rate is compared with (max_anomaly_rise)


@dataclass(frozen=True, slots=True)
class Policy:
    """How a rollout proceeds; `canary` is a device count or a percentage such as "10%"."""

    canary: int | str = 1
    wave_size: int = 0  # devices per wave after the canary; 0: all the rest at once
    soak_s: float = 60.0  # how long a wave must run healthy before the next one starts
    max_failures: int = 1  # failed device updates that stop the rollout
    max_anomaly_rate: float | None = None  # an updated device above this anomaly rate stops it
    max_latency_ms: float | None = None  # an updated device above this p95 latency stops it
    # an updated device whose anomaly rate rose more than this (a fraction, 0.2 = 20 points) above its rate on
    # the model before stops it: a threshold gone wrong flags nearly everything
    max_anomaly_rise: float | None = None
    wave_timeout_s: float = 1800.0  # a told device that has not finished by then times out (downloads, builds)

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
        if self.max_anomaly_rise is not None and not 0 <= self.max_anomaly_rise <= 1:
            raise QueryError("rollout policy: max_anomaly_rise is a fraction between 0 and 1 (0.2: 20 points)")
        if self.wave_timeout_s <= 0:
            raise QueryError("rollout policy: wave_timeout_s must be positive")


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
    told_for_s: float | None = None  # since the device was last told the new model
    online: bool = True  # the device's connection, from its birth and last will
    rate_before: float | None = None  # its anomaly rate on the model before; None without enough results


@dataclass(frozen=True, slots=True)
class Decision:
    state: str  # the rollout's next state
    send: tuple[int, ...] = ()  # targets to tell about the new model now
    note: str = ""
    timed_out: tuple[int, ...] = ()  # online targets that did not finish in time: failures
    left_behind: tuple[int, ...] = ()  # offline targets that did not finish in time: told again on reconnect


def decide(state: str, policy: Policy, targets: Sequence[TargetStatus]) -> Decision:
    """The next step of a live rollout: time out, stop it, send the next wave, wait, or finish."""
    if state not in LIVE:
        return Decision(state)
    late = [t for t in targets if t.state in UPDATING and t.told_for_s is not None
            and t.told_for_s > policy.wave_timeout_s]
    timed_out = tuple(t.key for t in late if t.online)
    left_behind = tuple(t.key for t in late if not t.online)
    if late:
        marks = dict.fromkeys(timed_out, TARGET_TIMED_OUT) | dict.fromkeys(left_behind, TARGET_OFFLINE)
        targets = [replace(t, state=marks.get(t.key, t.state)) for t in targets]
    decision = _decide(state, policy, targets)
    return replace(decision, timed_out=timed_out, left_behind=left_behind)


def _decide(state: str, policy: Policy, targets: Sequence[TargetStatus]) -> Decision:
    failed = [t for t in targets if t.state in FAILED]
    if len(failed) >= policy.max_failures:
        names = ", ".join(t.device + ("" if t.state == MODEL_FAILED else f" {t.state.replace('_', ' ')}")
                          for t in failed[:5])
        return Decision(ROLLOUT_FAILED, note=f"{len(failed)} device update(s) failed ({names}); "
                                             f"the limit is {policy.max_failures}")
    for t in targets:
        if t.state != MODEL_ACTIVE:
            continue
        if policy.max_anomaly_rate is not None and t.anomaly_rate is not None \
                and t.anomaly_rate > policy.max_anomaly_rate:
            return Decision(ROLLOUT_FAILED,
                            note=f"{t.device}: anomaly rate {t.anomaly_rate:.1%} on the new model is above "
                                 f"the bound {policy.max_anomaly_rate:.1%}")
        if policy.max_anomaly_rise is not None and t.anomaly_rate is not None and t.rate_before is not None \
                and t.anomaly_rate > t.rate_before + policy.max_anomaly_rise:
            return Decision(ROLLOUT_FAILED,
                            note=f"{t.device}: anomaly rate {t.anomaly_rate:.1%} on the new model against "
                                 f"{t.rate_before:.1%} before it, a rise above the bound of "
                                 f"{policy.max_anomaly_rise:.0%} points (a threshold gone wrong?)")
        if policy.max_latency_ms is not None and t.latency_ms is not None and t.latency_ms > policy.max_latency_ms:
            return Decision(ROLLOUT_FAILED,
                            note=f"{t.device}: p95 latency {t.latency_ms:.1f} ms on the new model is above "
                                 f"the bound {policy.max_latency_ms:.1f} ms")
    for wave in sorted({t.wave for t in targets}):
        members = [t for t in targets if t.wave == wave]
        phase = ROLLOUT_CANARY if wave == 0 else ROLLOUT_ROLLING
        pending = tuple(t.key for t in members if t.state == TARGET_PENDING)
        if pending:
            what = "canary" if wave == 0 else f"wave {wave}"
            return Decision(phase, send=pending, note=f"{what}: {len(pending)} device(s) updating")
        if any(t.state in UPDATING for t in members):
            return Decision(phase)
        active = [t for t in members if t.state == MODEL_ACTIVE]
        soaked = min((t.active_for_s or 0.0 for t in active), default=policy.soak_s)
        if soaked < policy.soak_s:
            return Decision(phase)
    behind = [t.device for t in targets if t.state == TARGET_OFFLINE]
    updated = sum(t.state == MODEL_ACTIVE for t in targets)
    note = f"{updated} device(s) updated"
    if behind:
        note += (f"; {len(behind)} offline when their wave timed out ({', '.join(behind[:5])}): "
                 "each is told again when it reconnects")
    return Decision(ROLLOUT_COMPLETED, note=note)


# -- the database ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A retained `model/desired` message for one device."""

    site: str
    device: str
    desired: messages.ModelDesired
    online: bool = True  # the device's connection when the message was made


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
    updated_at: datetime  # when the state last changed: its age
    connection: str = ""  # the device now: online, silent or offline
    last_seen: datetime | None = None  # when the hub last heard from it


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

    @property
    def can_pause(self) -> bool:
        return self.state in PAUSABLE

    @property
    def can_resume(self) -> bool:
        return self.state == ROLLOUT_PAUSED

    @property
    def can_abort(self) -> bool:
        return self.state in ABORTABLE

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.state] = out.get(t.state, 0) + 1
        return out


def start_rollout(session: Session, model_id: int, policy: Policy, *, site: str | None = None,
                  devices: Sequence[str] | None = None, note: str = "", user_id: int | None = None,
                  queue: bool = False) -> str:
    """Create a live rollout of a registry model; returns its id. Devices already on it are left out.

    With `queue`, devices busy in another live or paused rollout do not refuse it: it waits (state
    queued) and `advance` starts it once they are free.
    """
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
    rows = [d for d, _ in session.execute(query)]
    if devices:
        wanted = set(devices)
        rows = [d for d in rows if d.name in wanted]
        unknown = wanted - {d.name for d in rows}
        if unknown:
            raise NotFound(f"unknown device(s) {', '.join(sorted(unknown))}" + (f" at site {site!r}" if site else ""))
    rows = [d for d in rows if (d.model_id, d.model_version) != (model.name, model.version)]
    if not rows:
        raise QueryError(f"no device to update: every targeted device already runs {model.name} {model.version}")
    busy = _busy(session, [d.id for d in rows])
    same = sorted({rid for rid in busy.values() if session.get(Rollout, rid).model_id == model.id})
    if same:
        raise QueryError(f"rollout(s) {', '.join(same)} ship {model.name} {model.version} to these devices already")
    if busy and not queue:
        names = ", ".join(d.name for d in rows if d.id in busy)
        others = ", ".join(sorted(set(busy.values())))
        raise QueryError(f"device(s) {names[:200]} are in another live rollout ({others}); finish or abort it "
                         "first, or queue this one (queue: true, --queue) to start when they are free")
    rollout = Rollout(id=new_ulid(), model_id=model.id, site_id=site_row.id if site_row else None,
                      state=ROLLOUT_QUEUED if busy else ROLLOUT_CANARY, note=note, created_by_id=user_id,
                      wave_size=policy.wave_size, soak_s=policy.soak_s, max_failures=policy.max_failures,
                      max_anomaly_rate=policy.max_anomaly_rate, max_latency_ms=policy.max_latency_ms,
                      max_anomaly_rise=policy.max_anomaly_rise, wave_timeout_s=policy.wave_timeout_s,
                      canary_devices=0)
    session.add(rollout)
    if busy:
        rollout.note = _add_reason(note, f"queued behind rollout(s) {', '.join(sorted(set(busy.values())))}: "
                                         "it starts when their devices are free")
    _plan(session, rollout, policy, rows)
    session.flush()
    return rollout.id


def _busy(session: Session, device_ids: Sequence[int]) -> dict[int, str]:
    """{device id: rollout id} of the given devices that are in a live or paused rollout, or in a stopped one
    that has yet to send them back."""
    ids = list(device_ids) or [-1]
    live = session.execute(
        select(RolloutTarget.device_id, Rollout.id).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .where(Rollout.state.in_(BUSY), RolloutTarget.device_id.in_(ids)))
    going_back = session.execute(
        select(RolloutTarget.device_id, Rollout.id).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .where(Rollout.state.in_(STOPPED), RolloutTarget.device_id.in_(ids),
               RolloutTarget.sent_version != "", RolloutTarget.sent_version != RolloutTarget.previous_version))
    return dict([*live, *going_back])


def _sent_back_to(session: Session, device_id: int) -> tuple[str, str] | None:
    """(model, version) a stopped rollout sent the device back to, when that is the last it was told."""
    row = session.execute(
        select(RolloutTarget, Rollout.state).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .where(RolloutTarget.device_id == device_id, RolloutTarget.sent_version != "")
        .order_by(Rollout.created_at.desc()).limit(1)).first()
    if row is None:
        return None
    target, state = row
    if state in STOPPED and target.sent_version == target.previous_version:
        return target.previous_model, target.previous_version
    return None


def _plan(session: Session, rollout: Rollout, policy: Policy, devices: Sequence[Device],
          going_back: dict[int, tuple[str, str]] | None = None) -> None:
    """The canary, then waves of `wave_size`; each target remembers the model its device runs now (or the
    one a stopped rollout is sending it back to: `going_back`)."""
    canary = policy.canary_count(len(devices))
    rollout.canary_devices = canary
    size = policy.wave_size or max(len(devices) - canary, 1)
    for i, device in enumerate(devices):
        wave = 0 if i < canary else 1 + (i - canary) // size
        previous = (going_back or {}).get(device.id) or (device.model_id, device.model_version)
        session.add(RolloutTarget(rollout_id=rollout.id, device_id=device.id, wave=wave,
                                  previous_model=previous[0], previous_version=previous[1]))


def _start_queued(session: Session, now: datetime) -> None:
    """Start each queued rollout whose devices are free, oldest first, from what they run now."""
    for r in session.scalars(select(Rollout).where(Rollout.state == ROLLOUT_QUEUED).order_by(Rollout.created_at)):
        targets = list(session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == r.id)
                                       .order_by(RolloutTarget.wave, RolloutTarget.id)))
        if _busy(session, [t.device_id for t in targets]):
            continue
        model = session.get(Model, r.model_id)
        devices = [session.get(Device, t.device_id) for t in targets]
        for t in targets:
            session.delete(t)
        session.flush()
        left = [d for d in devices if d is not None and (d.model_id, d.model_version) != (model.name, model.version)]
        r.updated_at = now
        if not left:
            r.state = ROLLOUT_COMPLETED
            r.note = f"every device already ran {model.name} {model.version} when it was free"
            continue
        back = {d.id: b for d in left if (b := _sent_back_to(session, d.id)) is not None}
        _plan(session, r, _policy(r), left, back)
        r.state, r.note = ROLLOUT_CANARY, _add_reason(r.note, "started: its devices are free")
        session.flush()


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return rollout


def _policy(r: Rollout) -> Policy:
    return Policy(r.canary_devices, r.wave_size, r.soak_s, r.max_failures, r.max_anomaly_rate, r.max_latency_ms,
                  r.max_anomaly_rise, r.wave_timeout_s)


def pause(session: Session, rollout_id: str, note: str = "") -> None:
    """Stop sending new waves; updates already under way finish."""
    r = _rollout(session, rollout_id)
    if r.state not in PAUSABLE:
        raise QueryError(f"rollout {rollout_id} is {r.state}; only a canary or rolling rollout can be paused")
    r.paused_from, r.state, r.updated_at = r.state, ROLLOUT_PAUSED, utcnow()
    r.note = note or "paused by hand"


def resume(session: Session, rollout_id: str, note: str = "") -> None:
    """Go on from where the pause stopped; devices told before it that have not finished are told again."""
    r = _rollout(session, rollout_id)
    if r.state != ROLLOUT_PAUSED:
        raise QueryError(f"rollout {rollout_id} is {r.state}, not paused")
    r.state, r.paused_from, r.updated_at = r.paused_from or ROLLOUT_CANARY, None, utcnow()
    r.note = note or "resumed"
    for t in session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == r.id,
                                                         RolloutTarget.state.in_(UPDATING))):
        t.desired_at = None   # `advance` tells it again, and its wave timeout starts afresh


def abort(session: Session, rollout_id: str, note: str = "") -> None:
    """Stop the rollout; the controller then sends every device it touched back to its previous model."""
    r = _rollout(session, rollout_id)
    if r.state not in ABORTABLE:
        raise QueryError(f"rollout {rollout_id} is {r.state}; there is nothing to abort")
    r.state, r.note, r.updated_at = ROLLOUT_ROLLED_BACK, note or "aborted by hand", utcnow()


def _previous(session: Session, target: RolloutTarget) -> Model | None:
    return session.scalar(select(Model).where(Model.name == target.previous_model,
                                              Model.version == target.previous_version))


def _send_back(session: Session, now: datetime) -> list[Outgoing]:
    """Desired-model messages that return the devices of stopped rollouts to their previous models."""
    out = []
    rows = session.execute(
        select(RolloutTarget, Device, Site.name).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .join(Device, RolloutTarget.device_id == Device.id).join(Site, Device.site_id == Site.id)
        .where(Rollout.state.in_(STOPPED), RolloutTarget.sent_version != "",
               RolloutTarget.sent_version != RolloutTarget.previous_version))
    for target, device, site in rows:
        previous = _previous(session, target)
        if previous is None:
            note = (f"not sent back: its previous model {target.previous_model} {target.previous_version} "
                    "is not in the registry; the agent keeps its last good model")
        else:
            out.append(Outgoing(site, device.name, messages.ModelDesired(
                previous.name, previous.version, previous.url, previous.sha256, rollout_id=target.rollout_id),
                device.online))
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
    if target is None or target.state == TARGET_PENDING:
        return False
    rollout = session.get(Rollout, msg.rollout_id)
    model = session.get(Model, rollout.model_id) if rollout else None
    now = utcnow()
    if model is not None and msg.version and msg.version != model.version:
        # a report about the model the device goes back to: the update itself stays as it ended
        if msg.state in (MODEL_ACTIVE, MODEL_ROLLED_BACK):
            target.state = MODEL_ROLLED_BACK
            target.reason = _add_reason(target.reason, f"back on {msg.model_id} {msg.version}")
        target.updated_at = now
        return True
    target.state = TARGET_DESIRED if msg.state == MODEL_IDLE else msg.state
    target.reason = msg.reason[:MAX_REASON]
    target.updated_at = now
    if msg.state == MODEL_ACTIVE and target.active_at is None:
        target.active_at = now
    return True


def advance(session: Session, now: datetime | None = None) -> list[Outgoing]:
    """Move every live rollout one step; returns the desired-model messages to publish."""
    now = now or utcnow()
    out = _send_back(session, now)   # rollouts stopped by hand since the last step, before a queued one starts
    _start_queued(session, now)
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
            again = target.state in UPDATING and target.desired_at is None   # resumed: tell it again
            if target.id in send or again:
                target.state, target.desired_at, target.updated_at = TARGET_DESIRED, now, now
                target.sent_version = model.version
                out.append(Outgoing(site, device.name, messages.ModelDesired(
                    model.name, model.version, model.url, model.sha256, rollout_id=r.id), device.online))
            elif target.id in decision.timed_out:
                target.state, target.updated_at = TARGET_TIMED_OUT, now
                target.reason = _add_reason(target.reason, f"did not finish within {r.wave_timeout_s:g} s of "
                                                           "being told, while online")
            elif target.id in decision.left_behind:
                target.state, target.updated_at = TARGET_OFFLINE, now
                target.reason = _add_reason(target.reason, f"offline when its wave timed out "
                                                           f"({r.wave_timeout_s:g} s); told again when it reconnects")
        if decision.state != r.state or decision.note:
            r.state, r.updated_at = decision.state, now
            r.note = decision.note or r.note
    session.flush()
    out += _send_back(session, now)
    return out


def resend(session: Session, site: str, device: str, running: str) -> Outgoing | None:
    """What a device that just (re)connected running version `running` should be told again, if anything.

    The newest rollout that told it something decides: the new model, or the one it was sent back to. A
    broker restarted without persistence forgets retained messages; this is how a device still hears.
    """
    row = session.execute(
        select(RolloutTarget, Rollout).join(Rollout, RolloutTarget.rollout_id == Rollout.id)
        .join(Device, RolloutTarget.device_id == Device.id).join(Site, Device.site_id == Site.id)
        .where(Device.name == device, Site.name == site, RolloutTarget.sent_version != "")
        .order_by(Rollout.created_at.desc()).limit(1)).first()
    if row is None:
        return None
    target, rollout = row
    if target.sent_version == running:
        return None
    model = session.get(Model, rollout.model_id)
    if target.sent_version == model.version:
        if target.state == MODEL_FAILED or rollout.state in STOPPED:
            return None   # an update it refused is not retried; a stopped rollout sends it back instead
    else:
        model = _previous(session, target)
        if model is None or model.version != target.sent_version:
            return None
    return Outgoing(site, device, messages.ModelDesired(model.name, model.version, model.url, model.sha256,
                                                        rollout_id=rollout.id))


def _status(session: Session, t: RolloutTarget, d: Device, model: Model, now: datetime) -> TargetStatus:
    active_for = rate = latency = before = None
    if t.state == MODEL_ACTIVE and t.active_at is not None:
        active_for = (now - t.active_at).total_seconds()
        total, anomalies = session.execute(
            select(func.count(), func.count().filter(Result.verdict == "anomaly"))
            .where(Result.device_id == d.id, Result.model_version == model.version,
                   Result.received_at >= t.active_at)).one()
        rate = anomalies / total if total >= MIN_RESULTS_FOR_RATE else None
        if d.metrics_at is not None and d.metrics_at >= t.active_at:
            latency = d.latency_p95_ms
        if rate is not None and t.desired_at is not None and t.previous_version:
            before = _rate_before(session, d.id, t.previous_version, t.desired_at)
    told = (now - t.desired_at).total_seconds() if t.desired_at is not None else None
    return TargetStatus(t.id, d.name, t.wave, t.state, active_for, rate, latency, told, d.online, before)


def _rate_before(session: Session, device_id: int, version: str, until: datetime) -> float | None:
    """The anomaly rate of a device's last results on `version` before `until`; None without enough of them."""
    latest = (select(Result.verdict).where(Result.device_id == device_id, Result.model_version == version,
                                           Result.received_at < until)
              .order_by(Result.received_at.desc()).limit(BASELINE_RESULTS).subquery())
    total, anomalies = session.execute(
        select(func.count(), func.count().filter(latest.c.verdict == "anomaly"))).one()
    return anomalies / total if total >= MIN_RESULTS_FOR_RATE else None


def rollout_detail(session: Session, rollout_id: str, *, silent_after: timedelta = SILENT_AFTER,
                   now: datetime | None = None) -> RolloutDetail:
    r = _rollout(session, rollout_id)
    now = now or utcnow()
    model = session.get(Model, r.model_id)
    rows = session.execute(
        select(RolloutTarget, Device, Site.name).join(Device, RolloutTarget.device_id == Device.id)
        .join(Site, Device.site_id == Site.id).where(RolloutTarget.rollout_id == r.id)
        .order_by(RolloutTarget.wave, Site.name, Device.name))
    targets = [TargetView(d.name, site, t.wave, t.state, t.reason,
                          f"{t.previous_model} {t.previous_version}".strip(), t.desired_at, t.active_at,
                          t.updated_at, connection_state(d, now, silent_after), d.last_seen)
               for t, d, site in rows]
    return RolloutDetail(r.id, r.model_id, model.name, model.version, r.state, r.note, _policy(r), targets,
                         r.created_at, r.updated_at)
