"""Retention: delete old results and images, never anything a person has reviewed.

Three limits, each optional (0 switches it off):

- results captured more than `results_days` ago are deleted with their crops;
- images that no result received in the last `images_days` names are deleted
  (the results stay and show "image pruned"): an image file's modification
  time is the last time a stored result named it (see hub.store);
- beyond `images_max_bytes` in all, the least recently used images go first
  (never one used in the last two hours: the store marks use at most hourly).

A result with a review keeps its row, its crops and every image it names.
On PostgreSQL, where `results` is partitioned by month (hub.db.partitions),
a month wholly past the age limit with no reviewed result is dropped as a
whole (its crops deleted first), and the months ahead are created. Other rows
are deleted in chunks, each its own short transaction, so ingest and the
dashboard carry on while a large backlog is pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from hub.db import partitions
from hub.db.models import Crop, Result, Review
from hub.db.session import Database
from hub.services.common import now_utc
from hub.store import KEEP_RECENT_S, Images

log = logging.getLogger(__name__)

CHUNK = 5000  # results per delete transaction


@dataclass(frozen=True, slots=True)
class Policy:
    results_days: int = 365
    images_days: int = 30
    images_max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PruneReport:
    results: int  # deleted (or, in a dry run, that would be)
    images: int
    image_bytes: int
    kept_reviewed: int  # results past the age limit kept because they were reviewed
    dry_run: bool

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {self.results} results and {self.images} images "
            f"({self.image_bytes / 1e6:.1f} MB); kept {self.kept_reviewed} reviewed results "
            "past the age limit"
        )


def _unreviewed() -> object:
    return ~exists().where(Review.result_id == Result.id)


def _old_results(db: Database, cutoff: datetime, dry_run: bool) -> tuple[int, int]:
    """(deleted or deletable results, reviewed ones kept) captured before `cutoff`."""
    with db.session() as session:
        kept = session.scalar(
            select(func.count()).where(Result.ts < cutoff, ~_unreviewed())
        )
        if dry_run:
            return session.scalar(select(func.count()).where(Result.ts < cutoff, _unreviewed())), kept
    deleted = _drop_months(db, cutoff)
    while True:
        with db.transaction() as session:
            ids = list(
                session.scalars(select(Result.id).where(Result.ts < cutoff, _unreviewed()).limit(CHUNK))
            )
            if not ids:
                return deleted, kept
            session.execute(delete(Crop).where(Crop.result_id.in_(ids)))
            session.execute(delete(Result).where(Result.id.in_(ids)))
        deleted += len(ids)
        log.info("pruned %d results captured before %s", deleted, cutoff.isoformat())


def _drop_months(db: Database, cutoff: datetime) -> int:
    """Results deleted by dropping whole months before `cutoff` (PostgreSQL's partitions)."""
    deleted = 0
    while True:
        with db.engine.begin() as conn:
            if not partitions.is_partitioned(conn):
                return 0
            dropped = partitions.drop_before(conn, cutoff)
        if dropped is None:
            return deleted
        deleted += dropped.results


def ensure_partitions(db: Database, now: datetime | None = None) -> list[str]:
    """Create the months ahead on a partitioned PostgreSQL `results` (nothing elsewhere); their names."""
    with db.engine.begin() as conn:
        return partitions.ensure(conn, now or now_utc()) if partitions.is_partitioned(conn) else []


def reviewed_images(session: Session) -> set[str]:
    """Every image a reviewed result names (heat map, thumbnail, frame, crops)."""
    reviewed = select(Review.result_id)
    shas: set[str] = set()
    for row in session.execute(
        select(Result.heatmap_sha, Result.thumbnail_sha, Result.frame_sha).where(Result.id.in_(reviewed))
    ):
        shas.update(s for s in row if s)
    shas.update(
        s
        for s in session.scalars(select(Crop.image_sha).where(Crop.result_id.in_(reviewed)))
        if s
    )
    return shas


def _images(
    db: Database, store: Images, policy: Policy, now: datetime, dry_run: bool
) -> tuple[int, int]:
    """(images, bytes) deleted by the age and size limits."""
    with db.session() as session:
        protected = reviewed_images(session)
    cutoff = (now - timedelta(days=policy.images_days)).timestamp() if policy.images_days else None
    removed = freed = 0
    remaining = []
    for f in store.files():
        if f.sha in protected:
            continue
        old = cutoff is not None and f.mtime < cutoff
        if old and (dry_run or store.remove_if_unused_since(f, cutoff)):
            removed, freed = removed + 1, freed + f.size
            continue
        remaining.append(f)
    if policy.images_max_bytes:
        total = sum(f.size for f in remaining) + sum(store.size(s) or 0 for s in protected)
        spare_after = now.timestamp() - KEEP_RECENT_S  # ingest may skip touching these (hub.store)
        for f in sorted(remaining, key=lambda f: f.mtime):
            if total <= policy.images_max_bytes or f.mtime >= spare_after:
                break
            # removed only if no result named it since we looked
            if dry_run or store.remove_if_unused_since(f, f.mtime + 1e-3):
                removed, freed, total = removed + 1, freed + f.size, total - f.size
    return removed, freed


def prune(
    db: Database,
    store: Images,
    policy: Policy,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Apply `policy` once; with `dry_run`, count what would go and change nothing."""
    now = now or now_utc()
    if not dry_run:
        ensure_partitions(db, now)
    results = kept = 0
    if policy.results_days:
        results, kept = _old_results(db, now - timedelta(days=policy.results_days), dry_run)
    images, freed = (0, 0)
    if policy.images_days or policy.images_max_bytes:
        images, freed = _images(db, store, policy, now, dry_run)
    report = PruneReport(results, images, freed, kept, dry_run)
    log.info("retention: %s", report)
    return report
