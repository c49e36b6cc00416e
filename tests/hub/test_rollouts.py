"""Rollouts: the policy as a pure function, and the controller driving devices over a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from hub.db.models import Device, Model, Site
from hub.db.session import Database
from hub.rollouts import RolloutController
from hub.services import rollouts, users
from hub.services.common import QueryError
from hub.services.rollouts import Policy, TargetStatus, decide
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink, NotConnected
from tests.waiting import wait_for as wait

# -- the policy ----------------------------------------------------------------------------


def targets(*states: str, waves: tuple[int, ...] | None = None, **kw: float) -> list[TargetStatus]:
    waves = waves or tuple(range(len(states)))
    return [TargetStatus(i, f"d{i}", w, s, **kw) for i, (s, w) in enumerate(zip(states, waves, strict=True))]


def test_the_canary_goes_first_and_the_next_wave_waits_for_its_soak() -> None:
    policy = Policy(soak_s=30)
    first = decide("canary", policy, targets("pending", "pending", waves=(0, 1)))
    assert (first.state, first.send) == ("canary", (0,))
    assert decide("canary", policy, targets("downloading", "pending", waves=(0, 1))).send == ()
    soaking = targets("active", "pending", waves=(0, 1), active_for_s=10)
    assert decide("canary", policy, soaking).send == ()
    soaked = targets("active", "pending", waves=(0, 1), active_for_s=31)
    assert decide("canary", policy, soaked) == rollouts.Decision("rolling", (1,), "wave 1: 1 device(s) updating")
    done = decide("rolling", policy, targets("active", "active", waves=(0, 1), active_for_s=31))
    assert done.state == "completed"


def test_failures_and_health_bounds_stop_the_rollout() -> None:
    assert decide("canary", Policy(), targets("failed", "pending", waves=(0, 1))).state == "failed"
    # under the failure limit the wave goes on without the failed device
    lenient = decide("canary", Policy(max_failures=2, soak_s=0), targets("failed", "active", "pending",
                                                                        waves=(0, 0, 1), active_for_s=1))
    assert (lenient.state, lenient.send) == ("rolling", (2,))
    noisy = targets("active", "pending", waves=(0, 1), active_for_s=1, anomaly_rate=0.4)
    stopped = decide("canary", Policy(max_anomaly_rate=0.2), noisy)
    assert stopped.state == "failed" and "anomaly rate 40.0%" in stopped.note
    slow = targets("active", waves=(0,), active_for_s=1, latency_ms=80.0)
    assert decide("canary", Policy(max_latency_ms=50), slow).state == "failed"
    assert decide("paused", Policy(), targets("pending")).state == "paused"   # a pause sends nothing


def test_canary_counts_and_percentages() -> None:
    assert Policy(canary="10%").canary_count(25) == 3
    assert Policy(canary=5).canary_count(3) == 3
    for bad in ("0", "abc%", "150%"):
        with pytest.raises(QueryError):
            Policy(canary=bad).canary_count(10)


# -- the controller over a real broker -----------------------------------------------------


class FakeStation:
    """A device's update loop reduced to its messages: it answers each desired model with states.

    `fail_version` makes its update to that version fail, as a package that does not pass
    its self-test would.
    """

    def __init__(self, broker: tuple[str, int], site: str, name: str, fail_version: str = "",
                 running: str | None = None) -> None:
        self.site, self.name, self.fail_version, self.running = site, name, fail_version, running
        self.desired: list[messages.ModelDesired] = []
        self.lock = threading.Lock()
        # with `running`, a birth message naming that version on every connect, as an agent sends; the link is
        # in place before it connects, since its callbacks (the birth, a retained desire's answers) publish on it
        self.link = MqttLink(BrokerConfig(*broker), f"dev-{site}-{name}",
                             subscriptions=[(topics.topic(site, name, topics.MODEL_DESIRED), 1)],
                             on_message=self.on_desired, on_connect=self.birth if running else None)
        self.link.start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def birth(self) -> None:
        status = messages.Status(device=self.name, online=True, ts=time.time(), site=self.site,
                                 model_id="m", model_version=self.running or "")
        self.link.publish(topics.topic(self.site, self.name, topics.STATUS), messages.encode(status), qos=1)

    def on_desired(self, topic: str, payload: bytes) -> None:
        want = messages.decode(payload, expect=messages.ModelDesired)
        with self.lock:
            self.desired.append(want)
        threading.Thread(target=self._update, args=(want,), daemon=True).start()

    def _update(self, want: messages.ModelDesired) -> None:
        final = "failed" if want.version == self.fail_version else "active"
        if final == "active":
            self.running = want.version
        for state in ("downloading", "verifying", "testing", final):
            msg = messages.ModelState(self.name, time.time(), state, want.model_id, want.version, want.rollout_id,
                                      reason="self-test scores out of tolerance" if state == "failed" else "")
            try:
                self.link.publish(topics.topic(self.site, self.name, topics.MODEL_STATE), messages.encode(msg), qos=1)
            except NotConnected:
                return  # the test is over
            time.sleep(0.02)

    def versions(self) -> list[str]:
        with self.lock:
            return [d.version for d in self.desired]


@pytest.fixture
def site(hub_db: Database, unique: str) -> str:
    """A site of four devices running m 1, with m 1 and m 2 in the registry."""
    name = f"roll-{unique}"
    with hub_db.transaction() as s:
        site = Site(name=name)
        s.add(site)
        s.flush()
        for i in range(4):
            s.add(Device(site_id=site.id, name=f"cam-{i}", online=True, model_id=f"m-{unique}", model_version="1"))
        for version in ("1", "2"):
            s.add(Model(name=f"m-{unique}", version=version, method="stfpm", sha256="ab" * 32, size_bytes=1000,
                        url=f"http://hub.invalid/api/models/{version}/package"))
    return name


@pytest.fixture
def controller(hub_db: Database, broker: tuple[str, int], unique: str) -> Iterator[RolloutController]:
    c = RolloutController(hub_db, BrokerConfig(*broker), interval_s=0.1, client_id=f"rollouts-{unique}").start()
    assert c.wait_ready(10)
    yield c
    c.stop()


def model_id(db: Database, unique: str, version: str) -> int:
    with db.transaction() as s:
        return s.scalar(select(Model.id).where(Model.name == f"m-{unique}", Model.version == version))


def detail(db: Database, rollout_id: str) -> rollouts.RolloutDetail:
    with db.transaction() as s:
        return rollouts.rollout_detail(s, rollout_id)


def test_a_rollout_goes_canary_then_waves_to_every_device(hub_db, site, controller, broker, unique) -> None:
    stations = [FakeStation(broker, site, f"cam-{i}") for i in range(4)]
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1, wave_size=2, soak_s=0.5),
                                     site=site, note="retrained on 40 false alarms")
    wait(lambda: stations[0].versions() == ["2"], 10, "the canary's desired model")
    assert all(st.versions() == [] for st in stations[1:]), "the other devices wait for the canary"
    wait(lambda: detail(hub_db, rid).state == "completed", 20, "the rollout to complete")
    d = detail(hub_db, rid)
    assert [t.wave for t in d.targets] == [0, 1, 1, 2]
    assert all(t.state == "active" and t.previous == f"m-{unique} 1" for t in d.targets)
    assert all(st.versions() == ["2"] for st in stations)
    # each wave started only after the one before had run its soak on the new model
    by_wave = {t.wave: t for t in d.targets}
    assert by_wave[1].desired_at >= by_wave[0].active_at
    assert (by_wave[1].desired_at - by_wave[0].active_at).total_seconds() >= 0.45
    for st in stations:
        st.link.stop()


def test_a_failing_canary_stops_the_rollout_and_goes_back(hub_db, site, controller, broker, unique) -> None:
    stations = [FakeStation(broker, site, f"cam-{i}", fail_version="2") for i in range(4)]
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1), site=site)
    wait(lambda: detail(hub_db, rid).state == "failed", 10, "the rollout to fail")
    assert "1 device update(s) failed (cam-0)" in detail(hub_db, rid).note
    # the canary is told to go back to the model it ran; nobody else heard of version 2
    wait(lambda: stations[0].versions() == ["2", "1"], 10, "the canary's roll back")
    wait(lambda: detail(hub_db, rid).targets[0].state == "rolled_back", 10, "the canary back on version 1")
    time.sleep(0.3)
    assert all(st.versions() == [] for st in stations[1:])
    assert [t.state for t in detail(hub_db, rid).targets[1:]] == ["pending"] * 3
    for st in stations:
        st.link.stop()


def test_pause_holds_the_next_wave_until_resumed(hub_db, site, controller, broker, unique) -> None:
    stations = [FakeStation(broker, site, f"cam-{i}") for i in range(4)]
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=2, soak_s=0.2), site=site)
    wait(lambda: detail(hub_db, rid).counts().get("active") == 2, 10, "the canary pair active")
    with hub_db.transaction() as s:
        rollouts.pause(s, rid, "line 2 changeover")
    time.sleep(0.6)
    assert all(st.versions() == [] for st in stations[2:]), "a paused rollout sends no new wave"
    with hub_db.transaction() as s:
        with pytest.raises(QueryError):
            rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(), site=site, devices=["cam-0"])
        rollouts.resume(s, rid)
    wait(lambda: all(st.versions() == ["2"] for st in stations), 10, "the rest after the resume")
    wait(lambda: detail(hub_db, rid).state == "completed", 10, "the rollout to complete")
    assert detail(hub_db, rid).counts() == {"active": 4}
    for st in stations:
        st.link.stop()


def test_abort_sends_every_touched_device_back(hub_db, site, controller, broker, unique) -> None:
    stations = [FakeStation(broker, site, f"cam-{i}") for i in range(4)]
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1, soak_s=60), site=site)
    wait(lambda: detail(hub_db, rid).targets[0].state == "active", 10, "the canary active")
    with hub_db.transaction() as s:
        rollouts.abort(s, rid, "wrong class list")
    wait(lambda: stations[0].versions() == ["2", "1"], 10, "the canary sent back")
    d = detail(hub_db, rid)
    assert d.state == "rolled_back" and d.note == "wrong class list"
    assert all(st.versions() == [] for st in stations[1:])
    with hub_db.transaction() as s, pytest.raises(QueryError):
        rollouts.abort(s, rid)
    for st in stations:
        st.link.stop()


def test_the_rollout_command_plans_and_reports(hub_db, site, db_url, unique, capsys) -> None:
    from hub.cli import main

    mid = model_id(hub_db, unique, "2")
    assert main(["rollout", "start", str(mid), "--site", site, "--canary", "50%", "--wave-size", "1",
                 "--db", db_url]) == 0
    out = capsys.readouterr().out
    rid = out.split()[1].rstrip(":")
    assert f"m-{unique} 2, canary (4 pending)" in out
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["0", "0", "1", "2"]   # 2 canaries, then 1 a wave
    assert main(["rollout", "pause", rid, "--db", db_url, "--note", "shift change"]) == 0
    assert "paused" in capsys.readouterr().out
    assert main(["rollout", "pause", rid, "--db", db_url]) == 1
    assert "only a canary or rolling rollout can be paused" in capsys.readouterr().err
    assert main(["rollout", "start", "9999999", "--db", db_url]) == 1
    assert "no model 9999999 in the registry" in capsys.readouterr().err


def test_the_rollout_page_shows_each_device_and_admins_steer_it(hub_db, site, sign_in, unique) -> None:
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1, wave_size=2), site=site)
    operator, token = sign_in("operator")
    page = operator.get(f"/models/rollouts/{rid}").get_data(as_text=True)
    assert page.count(f">{site}/cam-") == 4 and "4 pending" in page and f"m-{unique} 1" in page
    assert "Abort and roll back" not in page                     # the buttons are for admins
    assert operator.post(f"/models/rollouts/{rid}/pause", data={"csrf_token": token}).status_code == 403
    admin, token = sign_in("admin")
    live = admin.get(f"/models/rollouts/{rid}").get_data(as_text=True)
    assert "Abort and roll back" in live and ">Pause<" in live and ">Resume<" not in live
    done = admin.post(f"/models/rollouts/{rid}/pause", data={"csrf_token": token, "note": "line stop"})
    assert done.status_code == 302
    assert detail(hub_db, rid).state == "paused" and detail(hub_db, rid).note == "line stop"
    paused = admin.get(f"/models/rollouts/{rid}").get_data(as_text=True)
    assert ">Resume<" in paused and ">Pause<" not in paused and "Abort and roll back" in paused
    again = admin.post(f"/models/rollouts/{rid}/pause", data={"csrf_token": token})
    assert again.status_code == 409 and "only a canary or rolling rollout" in again.get_data(as_text=True)
    assert admin.post(f"/models/rollouts/{rid}/pause", data={}).status_code in (400, 403)   # no CSRF token
    assert admin.get("/models/rollouts/nope").status_code == 404
    assert f"/models/rollouts/{rid}" in admin.get("/models/").get_data(as_text=True)


def test_retraining_cycles_are_recorded_and_shown_with_their_reason(hub_db, sign_in, unique) -> None:
    admin, _ = sign_in("admin")
    with hub_db.transaction() as s:
        users_token = users.create_token(s, f"t-{unique}", "admin")[1]
    bearer = {"Authorization": f"Bearer {users_token}"}
    refused = {"model_name": f"m-{unique}", "cycle": 3, "outcome": "refused", "new_images": 24,
               "reason": f"class screw: image AUROC 0.91 fell to 0.88 ({unique})", "gate": {"screw": [0.91, 0.88]}}
    created = admin.post("/api/retrain-cycles", json=refused, headers=bearer)
    assert created.status_code == 201 and created.get_json()["gate"] == {"screw": [0.91, 0.88]}
    bad = admin.post("/api/retrain-cycles", json={**refused, "outcome": "maybe"}, headers=bearer)
    assert bad.status_code == 400 and "outcome must be one of" in bad.get_json()["detail"]
    listed = admin.get("/api/retrain-cycles?limit=5", headers=bearer).get_json()["cycles"]
    assert listed[0]["reason"] == refused["reason"]
    page = admin.get("/models/").get_data(as_text=True)
    assert "Retraining" in page and refused["reason"] in page and f"m-{unique}" in page


# -- devices that are away, stuck, or busy ---------------------------------------------------


def test_a_wave_times_out_a_stuck_device_as_a_failure_and_leaves_an_offline_one_behind() -> None:
    policy = Policy(soak_s=0, wave_timeout_s=600)
    stuck = targets("active", "downloading", "pending", waves=(0, 1, 2), told_for_s=601, active_for_s=700)
    stopped = decide("rolling", policy, stuck)
    assert stopped.state == "failed" and stopped.timed_out == (1,)
    assert "1 device update(s) failed (d1 timed out)" in stopped.note
    away = [TargetStatus(0, "d0", 0, "active", active_for_s=700, told_for_s=700),
            TargetStatus(1, "d1", 1, "desired", told_for_s=601, online=False),
            TargetStatus(2, "d2", 1, "active", active_for_s=5, told_for_s=6)]
    went_on = decide("rolling", policy, away)
    assert went_on.state == "completed" and went_on.left_behind == (1,) and went_on.timed_out == ()
    assert "1 offline when their wave timed out (d1)" in went_on.note
    waiting = decide("rolling", policy, [*away[:1], TargetStatus(1, "d1", 1, "desired", told_for_s=599,
                                                                 online=False)])
    assert waiting.state == "rolling" and waiting.left_behind == ()   # not yet: the wave still waits for it


def test_an_anomaly_rate_that_jumps_after_the_update_stops_the_rollout(
        hub_db, site, unique, store, make_result) -> None:
    """A threshold gone wrong: 10 % anomalies before, all after; the rise bound stops it, the rate bound not set."""
    from datetime import UTC, datetime, timedelta

    from hub.services.writes import BatchWriter, Envelope

    start = datetime.now(UTC) - timedelta(minutes=10)
    before = [make_result(site, "cam-0", seed=i, crops=0, model_version="1", verdict="anomaly" if i % 10 == 0
                          else "ok") for i in range(40)]
    BatchWriter(hub_db, store).write([Envelope(site, "cam-0", r, start) for r in before])
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"),
                                     Policy(canary=1, soak_s=600, max_anomaly_rise=0.2), site=site)
        assert [o.device for o in rollouts.advance(s)] == ["cam-0"]
        active = messages.ModelState("cam-0", time.time(), "active", f"m-{unique}", "2", rid)
        assert rollouts.record_state(s, site, "cam-0", active)
    after = [make_result(site, "cam-0", seed=i, crops=0, model_version="2", verdict="anomaly") for i in range(25)]
    BatchWriter(hub_db, store).write([Envelope(site, "cam-0", r, datetime.now(UTC)) for r in after])
    with hub_db.transaction() as s:
        back = rollouts.advance(s)
    d = detail(hub_db, rid)
    assert d.state == "failed", d.note
    assert "cam-0: anomaly rate 100.0% on the new model against 10.0% before it" in d.note
    assert [(o.device, o.desired.version) for o in back] == [("cam-0", "1")]


def test_resume_tells_the_devices_still_updating_again(hub_db, site, unique) -> None:
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=2), site=site)
        assert len(rollouts.advance(s)) == 2
        rollouts.record_state(s, site, "cam-0", messages.ModelState("cam-0", time.time(), "downloading",
                                                                   f"m-{unique}", "2", rid))
        rollouts.pause(s, rid, "broker maintenance")
        assert rollouts.advance(s) == []
        rollouts.resume(s, rid)
        again = rollouts.advance(s)
    assert sorted(o.device for o in again) == ["cam-0", "cam-1"]
    assert all(o.desired.version == "2" and o.desired.rollout_id == rid for o in again)
    assert {t.device: t.state for t in detail(hub_db, rid).targets if t.wave == 0} == {"cam-0": "desired",
                                                                                        "cam-1": "desired"}


def test_a_rollout_of_busy_devices_waits_in_the_queue_and_starts_when_they_are_free(hub_db, site, unique) -> None:
    with hub_db.transaction() as s:
        s.add(Model(name=f"m-{unique}", version="3", method="stfpm", sha256="cd" * 32, size_bytes=1000,
                    url="http://hub.invalid/api/models/3/package"))
    with hub_db.transaction() as s:
        first = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1), site=site)
        rollouts.advance(s)
    with hub_db.transaction() as s, pytest.raises(QueryError, match=r"another live rollout .*queue"):
        rollouts.start_rollout(s, model_id(hub_db, unique, "3"), Policy(), site=site)
    with hub_db.transaction() as s:
        second = rollouts.start_rollout(s, model_id(hub_db, unique, "3"), Policy(canary=1), site=site, queue=True)
    assert detail(hub_db, second).state == "queued" and first in detail(hub_db, second).note
    with hub_db.transaction() as s:
        assert all(o.desired.version != "3" for o in rollouts.advance(s))   # still busy: it waits
        s.execute(Device.__table__.update().where(Device.name == "cam-0", Device.site_id == select(Site.id)
                                                  .where(Site.name == site).scalar_subquery())
                  .values(model_version="2"))   # the canary did update before the first one was aborted
        rollouts.abort(s, first, "superseded")
    with hub_db.transaction() as s:
        sent = rollouts.advance(s)
    d = detail(hub_db, second)
    assert d.state == "canary"
    # the aborted rollout sends its canary back first; the queued one's canary then goes to version 3
    assert [(o.device, o.desired.version, o.desired.rollout_id) for o in sent] == [
        ("cam-0", "1", first), ("cam-0", "3", second)]
    assert {t.device: t.previous for t in d.targets}["cam-0"] == f"m-{unique} 1"   # where it was sent back to


def test_a_device_that_missed_its_update_is_told_when_it_reconnects(
        hub_db, site, unique, private_broker, wait_for, caplog) -> None:
    """cam-3 is away during the rollout: its wave times out, the rollout completes without it, the broker
    restarts without persistence (the retained desire is gone); when cam-3 comes back it is told again."""
    import logging

    caplog.set_level(logging.INFO)
    broker = private_broker()
    with hub_db.transaction() as s:
        s.execute(Device.__table__.update().where(Device.name == "cam-3").values(online=False))
    controller = RolloutController(hub_db, BrokerConfig(broker.host, broker.port), interval_s=0.1,
                                   client_id=f"rollouts-{unique}").start()
    assert controller.wait_ready(10)
    stations = [FakeStation((broker.host, broker.port), site, f"cam-{i}", running="1") for i in range(3)]
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"),
                                     Policy(canary=1, soak_s=0.2, wave_timeout_s=1.0), site=site)
    wait_for(lambda: detail(hub_db, rid).state == "completed", 20, "the rollout to complete without cam-3")
    d = detail(hub_db, rid)
    assert {t.device: t.state for t in d.targets} == {"cam-0": "active", "cam-1": "active", "cam-2": "active",
                                                      "cam-3": "offline"}
    assert "cam-3" in d.note and "told again when it reconnects" in d.note
    assert {t.device: t.connection for t in d.targets}["cam-3"] == "offline"
    assert "is the hub running" not in caplog.text
    assert f"{site}/cam-3: desired model m-{unique} 2 (rollout {rid}); the device is offline" in caplog.text

    broker.stop()
    broker.start()   # persistence false: the retained desired models are gone
    assert controller.wait_ready(15)
    late = FakeStation((broker.host, broker.port), site, "cam-3", running="1")
    wait_for(lambda: late.versions() == ["2"], 15, "cam-3 told of version 2 on reconnecting")
    wait_for(lambda: {t.device: t.state for t in detail(hub_db, rid).targets}["cam-3"] == "active", 10,
             "cam-3 active on version 2")
    assert controller.resent >= 1
    time.sleep(0.5)
    assert all(st.versions() == ["2"] for st in stations)   # the others, already on it, were not told again
    for st in [*stations, late]:
        st.link.stop()
    controller.stop()


def test_a_birth_that_arrives_while_the_device_is_told_is_not_answered_again(
        hub_db, site, unique, private_broker, wait_for, monkeypatch) -> None:
    """A device's birth can reach the controller while a step is telling that device its new model: the
    connection it came from also receives the message, so the next step must not tell the device again."""
    broker = private_broker()
    controller = RolloutController(hub_db, BrokerConfig(broker.host, broker.port), interval_s=0.1,
                                   client_id=f"rollouts-{unique}").start()
    assert controller.wait_ready(10)
    station = FakeStation((broker.host, broker.port), site, "cam-0", running="1")
    time.sleep(0.5)   # its own birth is answered (there is no rollout yet)
    advance = rollouts.advance
    birth = messages.Status(device="cam-0", online=True, ts=time.time(), site=site, model_id="m", model_version="1")

    def advance_while_a_birth_arrives(session, now=None):
        out = advance(session, now)
        if any(o.device == "cam-0" for o in out):
            controller.handle(topics.topic(site, "cam-0", topics.STATUS), messages.encode(birth))
        return out

    monkeypatch.setattr(rollouts, "advance", advance_while_a_birth_arrives)
    with hub_db.transaction() as s:
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=1, soak_s=60), site=site)
    wait_for(lambda: {t.device: t.state for t in detail(hub_db, rid).targets}["cam-0"] == "active", 10,
             "cam-0 active on version 2")
    time.sleep(0.5)
    assert station.versions() == ["2"] and controller.resent == 0
    station.link.stop()
    controller.stop()


def test_the_api_refuses_unknown_keys_and_reads_pauses_resumes_and_aborts(hub_db, site, unique, app) -> None:
    with hub_db.transaction() as s:
        admin = users.create_token(s, f"admin-{unique}", "admin")[1]
        viewer = users.create_token(s, f"viewer-{unique}", "viewer")[1]
    client = app.test_client()
    as_admin, as_viewer = {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {viewer}"}
    mid = model_id(hub_db, unique, "2")
    typo = client.post("/api/rollouts", json={"model_id": mid, "site": site, "soak": 15}, headers=as_admin)
    detail_text = typo.get_json()["detail"]
    assert typo.status_code == 400 and "unknown key(s) 'soak'" in detail_text and "soak_s" in detail_text
    assert "wave_timeout_s" in detail_text and "queue" in detail_text
    created = client.post("/api/rollouts", json={"model_id": mid, "site": site, "soak_s": 15, "canary": 2,
                                                 "max_anomaly_rise": 0.2, "wave_timeout_s": 300}, headers=as_admin)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    rid = body["id"]
    assert body["policy"]["soak_s"] == 15 and body["policy"]["max_anomaly_rise"] == 0.2
    assert body["policy"]["wave_timeout_s"] == 300 and body["url"] == f"/models/rollouts/{rid}"

    status = client.get(f"/api/rollouts/{rid}", headers=as_viewer)
    assert status.status_code == 200 and status.get_json()["state"] == "canary"
    assert status.get_json()["counts"] == {"pending": 4}
    assert {t["connection"] for t in status.get_json()["targets"]} == {"silent"}   # online, never heard from
    assert client.get("/api/rollouts/nope", headers=as_viewer).status_code == 404

    assert client.post(f"/api/rollouts/{rid}/pause", headers=as_viewer).status_code == 403
    paused = client.post(f"/api/rollouts/{rid}/pause", json={"note": "line 2 changeover"}, headers=as_admin)
    assert paused.status_code == 200 and paused.get_json()["state"] == "paused"
    assert paused.get_json()["note"] == "line 2 changeover"
    again = client.post(f"/api/rollouts/{rid}/pause", headers=as_admin)
    assert again.status_code == 409 and "only a canary or rolling rollout can be paused" in again.get_json()["detail"]
    odd = client.post(f"/api/rollouts/{rid}/resume", json={"why": "x"}, headers=as_admin)
    assert odd.status_code == 400 and "unknown key(s) 'why'" in odd.get_json()["detail"]
    assert client.post(f"/api/rollouts/{rid}/resume", headers=as_admin).get_json()["state"] == "canary"
    assert client.post(f"/api/rollouts/{rid}/restart", headers=as_admin).status_code == 404
    aborted = client.post(f"/api/rollouts/{rid}/abort", json={"note": "wrong model"}, headers=as_admin)
    assert aborted.status_code == 200 and aborted.get_json()["state"] == "rolled_back"
    assert detail(hub_db, rid).state == "rolled_back"

    queued = client.post("/api/rollouts", json={"model_id": mid, "site": site, "queue": "yes"}, headers=as_admin)
    assert queued.status_code == 400 and "queue must be true or false" in queued.get_json()["detail"]


def test_the_rollout_page_shows_each_device_s_connection_and_the_age_of_its_state(
        hub_db, site, unique, sign_in) -> None:
    from datetime import UTC, datetime, timedelta

    with hub_db.transaction() as s:
        s.execute(Device.__table__.update().where(Device.name == "cam-1")
                  .values(online=False, last_seen=datetime.now(UTC) - timedelta(minutes=7)))
        rid = rollouts.start_rollout(s, model_id(hub_db, unique, "2"), Policy(canary=2), site=site)
        rollouts.advance(s)
    viewer, _ = sign_in("viewer")
    page = viewer.get(f"/models/rollouts/{rid}").get_data(as_text=True)
    row = page[page.index(f"{site}/cam-1"):]
    row = row[:row.index("</tr>")]
    assert "offline" in row and "last seen" in row and "7 min ago" in row
    assert "desired" in row and "since" in row and "just now" in row
    assert "a told device has 1800 s to finish" in page


def test_the_rollout_command_reads_the_hub_config_and_never_creates_a_database(
        hub_db, site, db_url, unique, tmp_path, monkeypatch, capsys) -> None:
    from hub.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["rollout", "status", "01HZZZZZZZZZZZZZZZZZZZZZZZ"]) == 1
    err = capsys.readouterr().err
    assert "no hub database at var/hub/hub.db" in err and "--config" in err and "--db" in err
    assert not (tmp_path / "var").exists(), "a read command made a database"

    config = tmp_path / "hub.toml"
    config.write_text(f'db = "{db_url}"\n')
    assert main(["rollout", "start", str(model_id(hub_db, unique, "2")), "--site", site, "--config", str(config),
                 "--wave-timeout", "120", "--max-anomaly-rise", "0.25"]) == 0
    rid = capsys.readouterr().out.split()[1].rstrip(":")
    assert detail(hub_db, rid).policy.wave_timeout_s == 120 and detail(hub_db, rid).policy.max_anomaly_rise == 0.25
    assert main(["rollout", "status", rid, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{site}/cam-0  pending since" in out and "(silent, last seen never)" in out
    assert main(["rollout", "start", str(model_id(hub_db, unique, "2")), "--site", site, "--config", str(config),
                 "--queue"]) == 1
    assert f"rollout(s) {rid} ship m-{unique} 2 to these devices already" in capsys.readouterr().err


@pytest.mark.parametrize("started_with", ["--config", "--db"])
def test_the_rollout_command_the_models_page_shows_works_as_shown_from_anywhere(
        hub_db, site, db_url, unique, tmp_path, monkeypatch, app, sign_in, started_with) -> None:
    import html
    import re
    import shlex

    from hub.cli import build_parser, cli_target, main, settings
    from hub.db.models import Rollout

    (tmp_path / "hub.toml").write_text(f'db = "{db_url}"\n')
    monkeypatch.chdir(tmp_path)   # the hub starts with paths relative to its own folder
    args = build_parser().parse_args(["serve", *(["--config", "hub.toml"] if started_with == "--config"
                                                 else ["--db", db_url])])
    app.config["HUB_CLI_TARGET"] = cli_target(args, settings(args))   # as `hub serve` sets it
    viewer, _ = sign_in("viewer")
    new = model_id(hub_db, unique, "2")
    page = viewer.get(f"/models/{new}").get_data(as_text=True)
    argv = shlex.split(html.unescape(re.search(r'<code class="command">([^<]+)</code>', page).group(1)))
    assert argv[:5] == ["kdfleet", "hub", "rollout", "start", str(new)]
    assert argv[argv.index("--site") + 1] == site, "the site whose devices run a version of the model"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # an admin's shell, anywhere
    assert main(argv[2:]) == 0
    assert not (elsewhere / "var").exists(), "the command made a database of its own"
    with hub_db.session() as s:
        assert s.scalar(select(Rollout.id).where(Rollout.model_id == new)) is not None


def test_cli_target_masks_a_database_password_and_makes_sqlite_paths_absolute(tmp_path, monkeypatch) -> None:
    from hub.cli import build_parser, cli_target, settings

    monkeypatch.chdir(tmp_path)

    def target(*flags: str) -> str:
        args = build_parser().parse_args(["serve", *flags])
        return cli_target(args, settings(args))

    assert target() == f"--db sqlite:///{tmp_path}/var/hub/hub.db"
    assert target("--db", "sqlite:///data/hub.db") == f"--db sqlite:///{tmp_path}/data/hub.db"
    assert target("--db", "postgresql+psycopg://kd:s3cret@db/kdfleet") == \
        "--db 'postgresql+psycopg://kd:***@db/kdfleet'"
    (tmp_path / "hub.toml").write_text('db = "postgresql+psycopg://kd:s3cret@db/kdfleet"\n')
    assert target("--config", "hub.toml") == f"--config {tmp_path}/hub.toml"
