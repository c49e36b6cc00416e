"""`kdfleet trainer serve --once` against a real hub over HTTP: collect reviewed false alarms, fine-tune,
gate, upload and roll out; and a refused candidate that uploads nothing."""

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
from hub.ingest import BatchWriter, Envelope
from hub.services import reviews, users
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
    from trainer.train import TrainConfig, train

    data = make_tiny_set(tmp_path_factory.mktemp("tiny"), n_train=24)
    cfg = TrainConfig(data=str(data), classes=("disc",), size=64, epochs=4, batch_size=8, threads=1,
                      out=str(tmp_path_factory.mktemp("base")))
    return data, train(cfg, progress=None)


@pytest.fixture
def reviewed(hub_db: Database, store: ImageStore, site: str, make_result: Callable[..., messages.Result]
             ) -> list[str]:
    """Results of `disc` frames at `site`, reviewed: new-supplier discs as false alarms, spots as defects."""
    rng = np.random.default_rng(7)
    frames = [(new_normal_disc(rng), "false_alarm") for _ in range(N_FALSE_ALARMS)]
    frames += [(_defect(new_normal_disc(rng), rng, "spot")[0], "defect") for _ in range(N_DEFECTS)]
    made = [(make_result(site, "cam-a", seed=i, cls="disc", frame=encode_jpeg(img, 95)), label)
            for i, (img, label) in enumerate(frames)]
    now = datetime.now(UTC)
    BatchWriter(hub_db, store).write([Envelope(site, "cam-a", r, now) for r, _ in made])
    with hub_db.transaction() as session:
        for r, label in made:
            reviews.add_review(session, r.id, label, "seen on the line", user_id=None)
    return [r.id for r, _ in made]


@pytest.fixture
def admin_token(hub_db: Database, unique: str) -> str:
    with hub_db.transaction() as session:
        return users.create_token(session, f"trainer-{unique}", "admin")[1]


def serve_once(hub_url: str, token: str, data: Path, base: Path, workdir: Path, *extra: str) -> int:
    """One cycle; the model's registry name is the workdir's, unique per test (PostgreSQL is shared)."""
    from trainer.serve import main

    return main(["--hub", hub_url, "--token", token, "--model-id", f"disc-{workdir.parent.name}",
                 "--workdir", str(workdir), "--data", str(data),
                 "--base", str(base), "--min-new", "10", "--epochs", "3", "--threads", "1", "--soak", "5",
                 "--once", *extra])


def last_cycle(workdir: Path) -> dict:
    return json.loads((workdir / "cycles.jsonl").read_text().splitlines()[-1])


def test_false_alarms_retrain_pass_the_gate_and_roll_out(
    live_hub, hub_db: Database, base_model, reviewed: list[str], admin_token: str, site: str, tmp_path: Path
) -> None:
    data, base = base_model
    key = new_key()
    save_keypair(key, tmp_path / "signing.pem")
    workdir = tmp_path / "work"
    rc = serve_once(live_hub[0], admin_token, data, base, workdir, "--key", str(tmp_path / "signing.pem"),
                    "--max-regression", "0.1", "--site", site)
    cycle = last_cycle(workdir)
    assert rc == 0 and cycle["status"] == "published", cycle
    # the trainer takes every reviewed result of the hub: on the shared PostgreSQL, other tests' too
    assert cycle["new_images"] >= N_FALSE_ALARMS + N_DEFECTS
    fa = cycle["gate"]["false_alarms"]
    assert fa["n"] >= N_FALSE_ALARMS
    assert fa["mean_candidate"] < fa["mean_current"], fa
    assert fa["above_threshold_current"] > 0, "the base model should flag the new-supplier discs"

    pkg = read_package(cycle["package"], trusted_keys=[key.public_key()])
    assert pkg.manifest["version"] == "0.1.1" and pkg.manifest["parent"] == "0.1.0"
    assert pkg.manifest["classes"] == ["disc"]
    with hub_db.session() as session:
        model = session.scalars(select(Model).where(Model.id == cycle["hub_model_id"])).one()
        assert (model.name, model.version) == (pkg.manifest["model_id"], "0.1.1")
        rollout = session.get(Rollout, cycle["rollout_id"])
        assert rollout is not None and rollout.model_id == model.id and rollout.state == "canary"
        assert session.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout.id)).all()

    # the dashboard shows the cycle and why
    reported = hub_cycles(live_hub[0], admin_token)[0]
    assert (reported["outcome"], reported["version"], reported["model_id"]) == ("published", "0.1.1", model.id)
    assert reported["reason"] == cycle["reason"] and reported["rollout_id"] == rollout.id
    assert reported["gate"]["false_alarms"]["n"] == fa["n"]

    # a second cycle finds nothing new and waits
    assert serve_once(live_hub[0], admin_token, data, base, workdir) == 0
    assert last_cycle(workdir)["status"] == "waiting"
    assert hub_cycles(live_hub[0], admin_token)[0]["outcome"] == "waiting"


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
