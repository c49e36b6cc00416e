"""`kdfleet trainer serve --once` against a real hub over HTTP: collect reviewed false alarms (some held out),
fine-tune the fleet's model, gate on the held-out images, upload and roll out (queued behind a busy rollout);
a refused candidate that uploads nothing; the gate and the lineage rules on their own."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from hub.db.models import Model, Rollout, RolloutTarget
from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope
from hub.services import registry, reviews, rollouts, users
from hub.store import ImageStore
from shared import messages
from shared.imaging import encode_jpeg
from shared.package import new_key, read_package, save_keypair
from tests.trainer.tiny_data import _defect, make_tiny_set

pytest.importorskip("torch")

N_FALSE_ALARMS = 12
N_DEFECTS = 2


def new_normal_disc(rng: np.random.Generator) -> np.ndarray:
    """A disc from a new supplier: blue instead of yellow. Good parts the base model has never seen."""
    img = np.clip(rng.normal(70, 4, (64, 80, 3)), 0, 255).astype(np.uint8)
    cx, cy = 40 + int(rng.integers(-3, 4)), 32 + int(rng.integers(-3, 4))
    cv2.circle(img, (cx, cy), 22, (60, 170, 200), -1)
    cv2.circle(img, (cx, cy), 8, (70, 70, 70), -1)
    return img


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, best.pt): a tiny STFPM on the `disc` class of the tiny set."""
    from trainer.config import TrainConfig
    from trainer.train import train

    data = make_tiny_set(tmp_path_factory.mktemp("tiny"), n_train=24)
    cfg = TrainConfig(data=str(data), classes=("disc",), size=64, epochs=4, batch_size=8, threads=1,
                      out=str(tmp_path_factory.mktemp("base")))
    return data, train(cfg, progress=None)


@pytest.fixture
def signing(tmp_path: Path) -> Path:
    """The site's private signing key; its .pub beside it."""
    save_keypair(new_key(), tmp_path / "signing.pem")
    return tmp_path / "signing.pem"


@pytest.fixture
def app(make_app, signing: Path):
    """The hub as deployed: it takes packages the site's key signed."""
    return make_app(HUB_TRUSTED_KEYS=[str(signing.with_suffix(".pub"))])


def model_name(tmp_path: Path) -> str:
    """The model's registry name in a test: unique, as PostgreSQL is shared between tests."""
    return f"disc-{tmp_path.name}"


@pytest.fixture
def reviewed(hub_db: Database, store: ImageStore, site: str, make_result: Callable[..., messages.Result],
             tmp_path: Path) -> list[str]:
    """Results of `disc` frames at `site` from cam-a, which runs version 2.0.0 of the model, reviewed:
    new-supplier discs as false alarms, spots as defects."""
    rng = np.random.default_rng(7)
    frames = [(new_normal_disc(rng), "false_alarm") for _ in range(N_FALSE_ALARMS)]
    frames += [(_defect(new_normal_disc(rng), rng, "spot")[0], "defect") for _ in range(N_DEFECTS)]
    made = [(make_result(site, "cam-a", seed=i, cls="disc", frame=encode_jpeg(img, 95)), label)
            for i, (img, label) in enumerate(frames)]
    now = datetime.now(UTC)
    birth = messages.Status(device="cam-a", online=True, ts=now.timestamp(), site=site, model_id=model_name(tmp_path),
                            model_version="2.0.0")
    BatchWriter(hub_db, store).write([Envelope(site, "cam-a", birth, now)]
                                     + [Envelope(site, "cam-a", r, now) for r, _ in made])
    with hub_db.transaction() as session:
        for r, label in made:
            reviews.add_review(session, r.id, label, "seen on the line", user_id=None)
    return [r.id for r, _ in made]


@pytest.fixture
def admin_token(hub_db: Database, unique: str) -> str:
    with hub_db.transaction() as session:
        return users.create_token(session, f"trainer-{unique}", "admin")[1]


def serve_once(hub_url: str, token: str, data: Path, base: Path, workdir: Path, *extra: str) -> int:
    """One cycle of the model `model_name` names (the workdir is in the test's tmp_path)."""
    from trainer.serve import main

    return main(["--hub", hub_url, "--token", token, "--model-id", model_name(workdir.parent),
                 "--workdir", str(workdir), "--data", str(data),
                 "--base", str(base), "--min-new", "10", "--epochs", "3", "--threads", "1", "--soak", "5",
                 "--once", *extra])


def last_cycle(workdir: Path) -> dict:
    return json.loads((workdir / "cycles.jsonl").read_text().splitlines()[-1])


def test_false_alarms_retrain_pass_the_gate_and_roll_out(
    live_hub, hub_db: Database, base_model, reviewed: list[str], admin_token: str, site: str, tmp_path: Path,
    signing: Path, unique: str
) -> None:
    data, base = base_model
    # cam-a is busy: another model's rollout is under way, so the candidate's rollout has to wait its turn
    with hub_db.transaction() as session:
        other = registry.register_model(session, {"name": f"other-{unique}", "version": "1", "sha256": "ab" * 32,
                                                  "size_bytes": 10, "url": "/elsewhere"}, user_id=None)
        busy = rollouts.start_rollout(session, other.id, rollouts.Policy(), site=site)
    workdir = tmp_path / "work"
    # 10 epochs learn the new supplier's discs; after 3 the candidate's threshold rises with their scores,
    # its recall falls from 67 % to 22 %, and the gate refuses it
    rc = serve_once(live_hub[0], admin_token, data, base, workdir, "--key", str(signing),
                    "--max-regression", "0.1", "--site", site, "--epochs", "10")
    cycle = last_cycle(workdir)
    assert rc == 0 and cycle["status"] == "published", cycle
    # the trainer takes every reviewed result of the hub: on the shared PostgreSQL, other tests' too
    assert cycle["new_images"] >= N_FALSE_ALARMS + N_DEFECTS

    # a share of the reviewed images is held out: never trained on, and what the gate judges by
    state = json.loads((workdir / "state.json").read_text())
    mine = {rid: state["collected"][rid] for rid in reviewed}
    held = {rid for rid, c in mine.items() if c["split"] == "holdout"}
    assert sum(mine[r]["role"] == "normal" for r in held) == round(0.3 * N_FALSE_ALARMS)
    trained_on = {p.name for p in (workdir / "cycles" / "0001" / "data" / "disc" / "train" / "good").iterdir()}
    assert not any(Path(mine[r]["file"]).name in n for r in held for n in trained_on)
    assert any(Path(mine[r]["file"]).name in n for r in set(mine) - held if mine[r]["role"] == "normal"
               for n in trained_on)
    gate = cycle["gate"]
    figures = gate["classes"]["disc"]
    for who in ("current", "candidate"):
        assert {"recall", "false_alarm_rate_test", "threshold", "held_out_false_alarm_rate"} <= set(figures[who])
    held_fa = gate["held_out"]["false_alarms"]
    assert held_fa["n"] >= round(0.3 * N_FALSE_ALARMS) and gate["trained"]["false_alarms"]["n"] >= 8
    assert held_fa["flagged_candidate"] < held_fa["flagged_current"], gate
    assert "held-out false alarms above the threshold" in cycle["reason"] and "recall" in cycle["reason"]

    # lineage: the parent is what the fleet runs (2.0.0, as cam-a reports), the version one patch above it
    pkg = read_package(cycle["package"], trusted_keys=[new_key().public_key(), _public(signing)])
    assert pkg.manifest.version == "2.0.1" and pkg.manifest.parent == "2.0.0"
    assert pkg.manifest.classes == ("disc",) and pkg.manifest.model_id == model_name(tmp_path)
    with hub_db.session() as session:
        model = session.scalars(select(Model).where(Model.id == cycle["hub_model_id"])).one()
        assert (model.name, model.version, model.parent_version) == (model_name(tmp_path), "2.0.1", "2.0.0")
        rollout = session.get(Rollout, cycle["rollout_id"])
        assert rollout is not None and rollout.model_id == model.id and rollout.state == "queued"
        # the health limits, with a default that catches a threshold gone wrong
        assert (rollout.max_failures, rollout.max_anomaly_rise, rollout.wave_timeout_s) == (1, 0.2, 1800)
        assert session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout.id)).all()
    assert f"rollout {rollout.id} queued" in cycle["reason"] and busy in cycle["reason"]
    with hub_db.transaction() as session:   # the other rollout ends: the retrained model's starts
        rollouts.abort(session, busy, "make way")
        rollouts.advance(session)
    with hub_db.session() as session:
        assert session.get(Rollout, cycle["rollout_id"]).state == "canary"

    # the dashboard shows the cycle and why
    reported = hub_cycles(live_hub[0], admin_token)[0]
    assert (reported["outcome"], reported["version"], reported["model_id"]) == ("published", "2.0.1", model.id)
    assert reported["reason"] == cycle["reason"] and reported["rollout_id"] == rollout.id
    assert reported["gate"]["held_out"]["false_alarms"]["n"] == held_fa["n"]

    # a second cycle finds nothing new and waits
    assert serve_once(live_hub[0], admin_token, data, base, workdir) == 0
    assert last_cycle(workdir)["status"] == "waiting"
    assert hub_cycles(live_hub[0], admin_token)[0]["outcome"] == "waiting"


def _public(private: Path):
    from shared.package import load_public_key

    return load_public_key(private.with_suffix(".pub"))


def test_a_candidate_that_fails_the_gate_is_not_uploaded(
    live_hub, hub_db: Database, base_model, reviewed: list[str], admin_token: str, tmp_path: Path
) -> None:
    data, base = base_model
    workdir = tmp_path / "work"
    with hub_db.session() as session:
        models_before = len(session.scalars(select(Model)).all())
        rollouts_before = len(session.scalars(select(Rollout)).all())
    # a negative allowance demands every class gain a full point of AUROC: no candidate can
    rc = serve_once(live_hub[0], admin_token, data, base, workdir, "--max-regression", "-1")
    cycle = last_cycle(workdir)
    assert rc == 0 and cycle["status"] == "refused", cycle
    assert "class disc: image AUROC" in cycle["reason"]
    with hub_db.session() as session:
        assert len(session.scalars(select(Model)).all()) == models_before
        assert len(session.scalars(select(Rollout)).all()) == rollouts_before
    assert not list((workdir / "cycles").rglob("*.kdpkg"))
    reported = hub_cycles(live_hub[0], admin_token)[0]
    assert reported["outcome"] == "refused" and "class disc: image AUROC" in reported["reason"]


def hub_cycles(hub_url: str, token: str) -> list[dict]:
    request = urllib.request.Request(f"{hub_url}/api/retrain-cycles", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["cycles"]


# -- the gate and the lineage rules on their own ----------------------------------------------------------


def evaluation(threshold: float, test_good: list[float], test_defects: list[float], held_fa: list[float],
               trained_fa: list[float], held_defects: list[float] = ()) -> dict:
    """A `scored` result for one class `c` (raw scores; the threshold as the model ships it)."""
    return {"classes": {"c": {
        "scores": [*test_good, *test_defects], "labels": [0] * len(test_good) + [1] * len(test_defects),
        "calibration": {"center": 0.0, "scale": threshold, "threshold": threshold},
        "hub": {"normal": {"holdout": list(held_fa), "train": list(trained_fa)},
                "defect": {"holdout": list(held_defects), "train": []}}}}}


def test_the_gate_judges_by_held_out_images_at_the_threshold_each_model_ships() -> None:
    from trainer.gate import Limits, gate

    good, defects = [0.1, 0.2, 0.3, 0.4], [1.2, 1.4, 1.6, 1.8, 2.0]
    current = evaluation(1.0, good, defects, held_fa=[1.1, 1.3, 0.5], trained_fa=[1.1, 1.2, 1.5, 0.9])
    # the candidate forgot the false alarms it was trained on, not those it never saw: self-graded, it would pass
    memorised = evaluation(1.0, good, defects, held_fa=[1.1, 1.3, 0.5], trained_fa=[0.2, 0.3, 0.2, 0.1])
    passed, reason, numbers = gate(current, memorised, ["c"], Limits())
    assert not passed and "held-out false alarms are not fewer: 2 -> 2 of 3" in reason
    assert numbers["trained"]["false_alarms"] == {"n": 4, "flagged_current": 3, "flagged_candidate": 0}
    # the same ranking (AUROC 1.0 both) but a threshold raised over most defects: recall falls
    raised = evaluation(1.7, good, defects, held_fa=[1.1, 1.3, 0.5], trained_fa=[0.2] * 4)
    passed, reason, numbers = gate(current, raised, ["c"], Limits())
    assert not passed and "class c: recall at the threshold 100.0% -> 40.0% of 5 defects" in reason
    assert numbers["classes"]["c"]["candidate"]["auroc"] == numbers["classes"]["c"]["current"]["auroc"] == 1.0
    # better on what it never saw, and no worse elsewhere: it ships, and the reason gives both sets' figures
    better = evaluation(1.0, good, defects, held_fa=[0.8, 1.3, 0.5], trained_fa=[0.2] * 4)
    passed, reason, _ = gate(current, better, ["c"], Limits())
    assert passed, reason
    assert "held-out false alarms above the threshold 2 -> 1 of 3; trained-on 3 -> 0 of 4" in reason
    assert "c: recall 100.0% -> 100.0%, false alarms on good test images 0.0% -> 0.0%" in reason
    noisy = evaluation(1.0, [0.1, 0.2, 1.3, 1.4], defects, held_fa=[0.8, 0.9, 0.5], trained_fa=[0.2] * 4)
    assert "false-alarm rate on good test images 0.0% -> 50.0%" in gate(current, noisy, ["c"], Limits())[1]


def test_reviewed_images_are_split_once_as_they_arrive() -> None:
    from trainer.gate import assign_split

    collected: dict[str, dict] = {}
    for i in range(20):
        for cls, role in (("a", "normal"), ("b", "normal"), ("a", "defect")):
            collected[f"{cls}-{role}-{i}"] = {"cls": cls, "role": role,
                                              "split": assign_split(collected, cls, role, 0.3)}
    for cls, role in (("a", "normal"), ("b", "normal"), ("a", "defect")):
        splits = [c["split"] for c in collected.values() if (c["cls"], c["role"]) == (cls, role)]
        assert splits.count("holdout") == 6 and splits[:3] == ["train", "holdout", "train"]


def test_the_base_is_what_the_fleet_runs_and_no_version_is_built_twice(live_hub, tmp_path: Path,
                                                                         admin_token: str) -> None:
    from trainer.serve import Hub, ServeConfig, ServeError, base_model, load_state, next_version

    cfg = ServeConfig(hub=live_hub[0], token=admin_token, workdir=tmp_path, data=tmp_path, base=tmp_path / "base.pt")
    state = load_state(tmp_path)
    assert base_model(cfg, state, ("disc", "2.0.0"))["checkpoint"] == str(tmp_path / "base.pt")
    state["releases"]["2.0.1"] = {"checkpoint": "cycle-1.pt", "package": "2.0.1.kdpkg"}
    assert base_model(cfg, state, ("disc", "2.0.1"))["checkpoint"] == "cycle-1.pt"
    # the fleet went back to 2.0.0 (a failed rollout, or a rollback by hand): so does the base
    back = base_model(cfg, state, ("disc", "2.0.0"))
    assert (back["version"], back["checkpoint"]) == ("2.0.0", str(tmp_path / "base.pt"))
    with pytest.raises(ServeError, match=r"the fleet runs disc 3\.0\.0, and this service has no checkpoint of it"):
        base_model(cfg, state, ("disc", "3.0.0"))
    with pytest.raises(ServeError, match="give --base-version"):
        base_model(cfg, load_state(tmp_path / "fresh"), None)

    hub = Hub(live_hub[0], admin_token)
    name = f"never-registered-{tmp_path.name}"
    assert next_version(hub, name, "2.0.0", []) == "2.0.1"
    # 2.0.1 was built and refused by the hub (or its upload failed): its version is not used again
    assert next_version(hub, name, "2.0.0", [[name, "2.0.1"], ["other", "9.0.0"]]) == "2.0.2"


def test_retrained_rollouts_carry_health_limits_that_catch_a_threshold_gone_wrong(tmp_path: Path,
                                                                                  base_model) -> None:
    from trainer.serve import parse_config, rollout_policy

    data, base = base_model
    cfg, _ = parse_config(["--hub", "http://hub", "--token", "t", "--workdir", str(tmp_path), "--data", str(data),
                           "--base", str(base)])
    policy = rollout_policy(cfg, 7, "note")
    assert (policy["max_failures"], policy["max_anomaly_rise"], policy["queue"]) == (1, 0.2, True)
    assert policy["max_anomaly_rate"] is None and policy["max_latency_ms"] is None
    cfg, _ = parse_config(["--hub", "http://hub", "--token", "t", "--workdir", str(tmp_path), "--data", str(data),
                           "--base", str(base), "--max-failures", "2", "--max-anomaly-rate", "0.5",
                           "--max-latency-ms", "40", "--max-anomaly-rise", "0", "--wave-timeout", "600"])
    policy = rollout_policy(cfg, 7, "note")
    assert (policy["max_failures"], policy["max_anomaly_rate"], policy["max_latency_ms"]) == (2, 0.5, 40)
    assert policy["max_anomaly_rise"] is None and policy["wave_timeout_s"] == 600
    from hub.web.api import ROLLOUT_KEYS

    assert set(policy) <= set(ROLLOUT_KEYS)   # the hub takes every key it sends
