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

    def __init__(self, broker: tuple[str, int], site: str, name: str, fail_version: str = "") -> None:
        self.site, self.name, self.fail_version = site, name, fail_version
        self.desired: list[messages.ModelDesired] = []
        self.lock = threading.Lock()
        self.link = MqttLink(BrokerConfig(*broker), f"dev-{site}-{name}",
                             subscriptions=[(topics.topic(site, name, topics.MODEL_DESIRED), 1)],
                             on_message=self.on_desired).start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def on_desired(self, topic: str, payload: bytes) -> None:
        want = messages.decode(payload, expect=messages.ModelDesired)
        with self.lock:
            self.desired.append(want)
        threading.Thread(target=self._update, args=(want,), daemon=True).start()

    def _update(self, want: messages.ModelDesired) -> None:
        final = "failed" if want.version == self.fail_version else "active"
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
    assert "Abort and roll back" in admin.get(f"/models/rollouts/{rid}").get_data(as_text=True)
    done = admin.post(f"/models/rollouts/{rid}/pause", data={"csrf_token": token, "note": "line stop"})
    assert done.status_code == 302
    assert detail(hub_db, rid).state == "paused" and detail(hub_db, rid).note == "line stop"
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
