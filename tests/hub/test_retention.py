"""Retention: old results and images go, by age and by size; reviewed ones never do."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from hub.cli import main
from hub.db.models import Crop, Result
from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope
from hub.services import retention, reviews
from hub.store import ImageStore
from shared import messages

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    """A store of this test's own: retention deletes from it."""
    return ImageStore(tmp_path / "images")


def _age(store: ImageStore, result: messages.Result, days: float) -> None:
    """Make the result's images look last used `days` ago."""
    when = time.time() - days * DAY
    for data in (result.heatmap, result.thumbnail, *(c.jpeg for c in result.crops)):
        os.utime(store.find(store.put(data)), (when, when))


@pytest.fixture
def aged(hub_db: Database, store: ImageStore, unique: str, make_result) -> dict[str, messages.Result]:
    """Results captured 400, 100, 40 and 1 day(s) ago (images used as long ago); the 400-day-old
    anomaly 'kept' is reviewed."""
    site = f"ret-{unique}"
    now = time.time()
    made = {
        name: make_result(site, "cam-r", seed=seed, crops=2, ts=now - days * DAY)
        for name, seed, days in (("kept", 71, 400), ("ancient", 72, 400), ("old", 73, 100),
                                 ("month", 74, 40), ("fresh", 75, 1))
    }
    received = datetime.now(UTC)
    BatchWriter(hub_db, store).write([Envelope(site, "cam-r", r, received) for r in made.values()])
    for name, days in (("kept", 400), ("ancient", 400), ("old", 100), ("month", 40), ("fresh", 1)):
        _age(store, made[name], days)
    with hub_db.transaction() as session:
        reviews.add_review(session, made["kept"].id, "false_alarm", "glare", user_id=None)
    return made


def _ids(db: Database, made: dict[str, messages.Result]) -> set[str]:
    with db.session() as session:
        found = set(session.scalars(select(Result.id).where(Result.id.in_([r.id for r in made.values()]))))
    return {name for name, r in made.items() if r.id in found}


def _images_left(store: ImageStore, r: messages.Result) -> int:
    return sum(store.find(store_sha) is not None for store_sha in _shas(r))


def _shas(r: messages.Result) -> list[str]:
    import hashlib

    return [hashlib.sha256(d).hexdigest() for d in (r.heatmap, r.thumbnail, *(c.jpeg for c in r.crops))]


def test_old_results_and_images_go_reviewed_ones_stay(
    hub_db: Database, store: ImageStore, aged: dict[str, messages.Result]
) -> None:
    policy = retention.Policy(results_days=365, images_days=30)
    dry = retention.prune(hub_db, store, policy, dry_run=True)
    assert dry.dry_run and dry.results >= 1 and dry.images >= 8
    assert _ids(hub_db, aged) == set(aged), "a dry run deletes nothing"
    assert all(_images_left(store, r) == 4 for r in aged.values())

    report = retention.prune(hub_db, store, policy)
    assert report.results >= 1 and report.kept_reviewed >= 1
    assert _ids(hub_db, aged) == {"kept", "old", "month", "fresh"}
    with hub_db.session() as session:
        crops = session.scalar(select(func.count()).select_from(Crop).where(Crop.result_id == aged["ancient"].id))
    assert crops == 0
    assert _images_left(store, aged["kept"]) == 4, "a reviewed result keeps its images"
    assert _images_left(store, aged["ancient"]) == 0
    assert _images_left(store, aged["old"]) == 0 and _images_left(store, aged["month"]) == 0
    assert _images_left(store, aged["fresh"]) == 4
    assert "deleted" in str(report)


def test_the_size_limit_drops_the_least_recently_used_images_first(
    hub_db: Database, store: ImageStore, aged: dict[str, messages.Result]
) -> None:
    total = sum(f.size for f in store.files())
    fresh = sum(store.find(s).stat().st_size for s in _shas(aged["fresh"]))
    kept = sum(store.find(s).stat().st_size for s in _shas(aged["kept"]))
    report = retention.prune(
        hub_db, store, retention.Policy(results_days=0, images_days=0, images_max_bytes=fresh + kept + 1)
    )
    assert report.results == 0 and report.image_bytes >= total - fresh - kept - 1
    assert _images_left(store, aged["fresh"]) == 4 and _images_left(store, aged["kept"]) == 4
    assert _images_left(store, aged["month"]) == 0
    assert _ids(hub_db, aged) == set(aged)  # the rows stay: only images went


def test_an_image_used_again_while_pruning_is_kept(store: ImageStore, make_result) -> None:
    r = make_result("s", "d", crops=0)
    sha = store.put(r.thumbnail)
    path = store.find(sha)
    os.utime(path, (time.time() - 90 * DAY,) * 2)
    seen = next(f for f in store.files() if f.sha == sha)
    ImageStore(store.root).put(r.thumbnail)  # ingest names it between the scan and the delete
    assert not store.remove_if_unused_since(seen, time.time() - 30 * DAY)
    assert store.find(sha) == path and path.read_bytes() == r.thumbnail
    assert not list(path.parent.glob(".prune-*"))


def test_prune_command_reports_and_refuses_a_bad_policy(
    db_url: str, hub_db: Database, tmp_path: Path, aged, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", db_url, "--data-dir", str(tmp_path)]
    assert main(["prune", *args, "--dry-run"]) == 0
    assert "would delete" in capsys.readouterr().out
    assert main(["prune", *args, "--results-days", "10", "--images-days", "30"]) == 2
    assert "images_days" in capsys.readouterr().err
    assert main(["prune", *args, "--results-days", "365"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert _ids(hub_db, aged) == {"kept", "old", "month", "fresh"}
