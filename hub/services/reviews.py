"""Reviews: a person's judgement of a result, and the training data they make.

A result may be reviewed more than once (a second look, a correction); the
latest review counts. Reviewed results are never pruned. False alarms, frames
the model flagged that a person found good, are the most useful new training
data there is: `training_data` lists them with their images for the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.db.models import Device, ProductClass, Result, Review, Site, Station, User
from hub.services.common import DEFAULT_PAGE, NotFound, QueryError
from shared.vocabulary import REVIEW_FALSE_ALARM, REVIEW_LABELS

MAX_NOTE = 2000


@dataclass(frozen=True, slots=True)
class ReviewView:
    id: int
    result_id: str
    label: str
    note: str
    created_at: datetime
    reviewer: str | None  # None once the user is deleted
    site: str
    device: str
    station: str
    cls: str
    score: float
    threshold: float
    verdict: str
    ts: datetime
    thumbnail_sha: str | None
    heatmap_sha: str | None
    frame_sha: str | None
    latest: bool  # the result's latest review (the one that counts)


@dataclass(frozen=True, slots=True)
class ReviewPage:
    items: list[ReviewView]
    next_before: int | None


def check_label(label: str) -> str:
    if label not in REVIEW_LABELS:
        raise QueryError(f"label must be one of {', '.join(REVIEW_LABELS)}, not {label!r}")
    return label


def _checked_note(label: str, note: str) -> str:
    check_label(label)
    note = note.strip()
    if len(note) > MAX_NOTE:
        raise QueryError(f"the note has {len(note)} characters; keep it under {MAX_NOTE}")
    return note


def add_review(
    session: Session, result_id: str, label: str, note: str = "", *, user_id: int | None
) -> int:
    """Record a judgement of a result; returns the review's id. The caller commits."""
    note = _checked_note(label, note)
    if session.get(Result, result_id) is None:
        raise NotFound(f"no result with id {result_id!r}")
    review = Review(result_id=result_id, label=label, comment=note, user_id=user_id)
    session.add(review)
    session.flush()
    return review.id


def add_reviews(
    session: Session, result_ids: list[str], label: str, note: str = "", *, user_id: int | None
) -> int:
    """The same judgement of several results at once (one frame's repeats, a selection); returns how
    many were recorded. Ids of results that are gone (pruned meanwhile) are passed over. The caller commits."""
    note = _checked_note(label, note)
    found = list(session.scalars(select(Result.id).where(Result.id.in_(result_ids)))) if result_ids else []
    session.add_all(Review(result_id=rid, label=label, comment=note, user_id=user_id) for rid in found)
    session.flush()
    return len(found)


def _query() -> object:
    latest = (
        select(func.max(Review.id)).where(Review.result_id == Result.id).correlate(Result)
    ).scalar_subquery()
    return (
        select(
            Review,
            User.username,
            Site.name,
            Device.name,
            Station.name,
            ProductClass.name,
            Result,
            Review.id == latest,
        )
        .join(Review.result)
        .outerjoin(Review.user)
        .join(Result.device)
        .join(Device.site)
        .join(Result.station)
        .join(Result.product_class)
    )


def _view(row: object) -> ReviewView:
    review, reviewer, site, device, station, cls, r, latest = row
    return ReviewView(
        id=review.id,
        result_id=review.result_id,
        label=review.label,
        note=review.comment,
        created_at=review.created_at,
        reviewer=reviewer,
        site=site,
        device=device,
        station=station,
        cls=cls,
        score=r.score,
        threshold=r.threshold,
        verdict=r.verdict,
        ts=r.ts,
        thumbnail_sha=r.thumbnail_sha,
        heatmap_sha=r.heatmap_sha,
        frame_sha=r.frame_sha,
        latest=bool(latest),
    )


def reviews_of(session: Session, result_id: str) -> list[ReviewView]:
    """Every review of one result, newest first."""
    stmt = _query().where(Review.result_id == result_id).order_by(Review.id.desc())
    return [_view(row) for row in session.execute(stmt)]


def list_reviews(
    session: Session,
    *,
    label: str | None = None,
    cls: str | None = None,
    since: datetime | None = None,
    latest_only: bool = False,
    before: int | None = None,
    limit: int = DEFAULT_PAGE,
) -> ReviewPage:
    """Reviews, newest first; `latest_only` keeps each result's latest review only."""
    stmt = _query()
    if label is not None:
        stmt = stmt.where(Review.label == check_label(label))
    if cls is not None:
        stmt = stmt.where(ProductClass.name == cls)
    if since is not None:
        stmt = stmt.where(Review.created_at >= since)
    if latest_only:
        stmt = stmt.where(Review.id.in_(select(func.max(Review.id)).group_by(Review.result_id)))
    if before is not None:
        stmt = stmt.where(Review.id < before)
    rows = session.execute(stmt.order_by(Review.id.desc()).limit(limit + 1)).all()
    items = [_view(row) for row in rows[:limit]]
    return ReviewPage(items, items[-1].id if len(rows) > limit else None)


def training_data(
    session: Session,
    *,
    label: str = REVIEW_FALSE_ALARM,
    cls: str | None = None,
    since: datetime | None = None,
    before: int | None = None,
    limit: int = DEFAULT_PAGE,
) -> ReviewPage:
    """Results whose latest review is `label` (by default the false alarms), with their images."""
    return list_reviews(
        session, label=label, cls=cls, since=since, latest_only=True, before=before, limit=limit
    )


def review_counts(session: Session) -> dict[str, int]:
    """How many results have each label as their latest review."""
    latest = select(func.max(Review.id)).group_by(Review.result_id)
    rows = session.execute(
        select(Review.label, func.count()).where(Review.id.in_(latest)).group_by(Review.label)
    )
    return {label: 0 for label in REVIEW_LABELS} | dict(rows.all())
