"""Which results a page shows: the filter (from a query string), its WHERE clauses, the rows as views.

Name filters (site, device, station, class) are resolved to ids first, which
lets the database walk the one index that serves the filter in the order the
page wants. Time filters also bound the result id: ULIDs are made when the
agent scores a frame, a moment after its capture, so ``ts >= since`` implies
an id made at or after ``since`` (an index range on the primary key instead of
a scan). The reads that use them are in `hub.services.results`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, bindparam, func, literal_column, select
from sqlalchemy.orm import Session, selectinload

from hub.db.models import Device, ProductClass, Result, Review, Site, Station
from hub.services.common import (
    DEFAULT_PAGE,
    MAX_PAGE,
    QueryError,
    check_ulid,
    parse_limit,
    parse_time,
    ulid_floor,
)
from hub.store import is_sha
from shared.vocabulary import REVIEW_LABELS, VERDICTS

SORTS = ("newest", "score")
REVIEW_STATES = ("unreviewed", "reviewed", *REVIEW_LABELS)
ID_AFTER_CAPTURE = timedelta(minutes=10)  # longest an agent takes from capture to making the id


@dataclass(frozen=True, slots=True)
class CropView:
    idx: int
    x: int
    y: int
    w: int
    h: int
    score: float
    image_sha: str | None


@dataclass(frozen=True, slots=True)
class ResultView:
    id: str
    ts: datetime
    received_at: datetime
    site: str
    device: str
    station: str
    cls: str
    model_version: str
    score: float
    norm_score: float
    threshold: float
    verdict: str
    latency_ms: float
    heatmap_sha: str | None
    thumbnail_sha: str | None
    frame_sha: str | None
    source: str
    crops: tuple[CropView, ...]
    review: str | None  # the latest review's label, None while unreviewed


@dataclass(frozen=True, slots=True)
class ResultFilter:
    """Which results to list and in which order; `limit` per page, further pages via `before`."""

    site: str | None = None
    device: str | None = None
    station: str | None = None
    cls: str | None = None
    verdict: str | None = None
    review: str | None = None  # REVIEW_STATES
    image: str | None = None  # a thumbnail's sha256: every result of that frame
    since: datetime | None = None  # capture time, inclusive
    until: datetime | None = None  # capture time, exclusive
    sort: str = "newest"  # SORTS
    before: str | None = None  # cursor: a result id (newest) or "<score>~<id>" (score)
    limit: int = DEFAULT_PAGE

    FIELDS = (
        "site", "device", "station", "cls", "verdict", "review", "image", "since", "until", "sort",
        "before", "limit",
    )  # fmt: skip

    @classmethod
    def from_query(
        cls, args: Mapping[str, str], *, default_sort: str = "newest", **fixed: Any
    ) -> ResultFilter:
        """Build from query-string values (empty means "any"), then `fixed`; raises QueryError."""
        v = {k: (args.get(k) or "").strip() or None for k in cls.FIELDS}
        if v["verdict"] is not None and v["verdict"] not in VERDICTS:
            raise QueryError(f"verdict must be one of {', '.join(VERDICTS)}, not {v['verdict']!r}")
        if v["review"] is not None and v["review"] not in REVIEW_STATES:
            raise QueryError(
                f"review must be one of {', '.join(REVIEW_STATES)}, not {v['review']!r}"
            )
        if v["image"] is not None and not is_sha(v["image"]):
            raise QueryError(f"image must be a sha256 (64 hexadecimal digits), not {v['image']!r}")
        sort = v["sort"] or default_sort
        if sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        since = parse_time(v["since"], "since") if v["since"] else None
        until = parse_time(v["until"], "until") if v["until"] else None
        if since and until and since >= until:
            raise QueryError("since must be earlier than until")
        if v["before"] is not None:
            parse_cursor(v["before"], sort)
        values = {
            **v,
            "since": since,
            "until": until,
            "sort": sort,
            "limit": parse_limit(v["limit"], DEFAULT_PAGE, MAX_PAGE),
        }
        return cls(**(values | fixed))

    def query_args(self, **changes: Any) -> dict[str, str]:
        """The filters set, as query-string values (for links to other pages)."""
        out = {}
        for k in self.FIELDS:
            value = changes.get(k, getattr(self, k))
            if value is None or (k == "limit" and value == DEFAULT_PAGE):
                continue
            out[k] = value.isoformat() if isinstance(value, datetime) else str(value)
        return out

    @property
    def filtered(self) -> bool:
        """True when any filter narrows the list (paging and sorting aside)."""
        return any(getattr(self, k) is not None for k in self.FIELDS[:9])


def parse_cursor(cursor: str, sort: str) -> tuple[float, str] | str:
    """A `before` value: a result id (newest first) or (score, id) (by score); raises QueryError."""
    if sort == "newest":
        return check_ulid(cursor, "before")
    score, _, rid = cursor.partition("~")
    try:
        return float(score), check_ulid(rid, "before")
    except ValueError:
        raise QueryError(
            f"before must be '<score>~<result id>' when sorting by score, not {cursor!r}"
        ) from None


def cursor_of(r: ResultView, sort: str) -> str:
    """The `before` value of the page that follows `r`."""
    return r.id if sort == "newest" else f"{r.score!r}~{r.id}"


# -- building the query -----------------------------------------------------------


def _latest_review() -> Any:
    """The label of a result's latest review (a correlated subquery; NULL when unreviewed)."""
    return (
        select(Review.label)
        .where(Review.result_id == Result.id)
        .order_by(Review.id.desc())
        .limit(1)
        .correlate(Result)
        .scalar_subquery()
    )


def base_query() -> Select[Any]:
    """Results with their names, crops and latest review, as `view_of` reads them."""
    return (
        select(Result, Site.name, Device.name, Station.name, ProductClass.name, _latest_review())
        .join(Result.device)
        .join(Device.site)
        .join(Result.station)
        .join(Result.product_class)
        .options(selectinload(Result.crops))
    )


def _ids(session: Session, stmt: Select[Any]) -> list[int]:
    return list(session.scalars(stmt))


def _match(column: Any, ids: list[int]) -> Any:
    return column == ids[0] if len(ids) == 1 else column.in_(ids)


def conditions(
    session: Session, f: ResultFilter, R: Any = Result, *, row_by_row: bool = False, in_frame: bool = False
) -> list[Any] | None:
    """WHERE clauses for `f` (names resolved to ids) on `R`, the results table or an alias of it;
    None when no result can match.

    `row_by_row`: the review state is looked up for each row in turn, for a query that walks an
    index in order and stops at its LIMIT (a join reads every row first). `in_frame` as well: the
    device, station and class are checked on each row and offered to no index, for a subquery
    that walks one frame's rows along a thumbnail index; else PostgreSQL, planning from averages,
    may combine the site's index with the frame's instead and read every result of the site
    (313,000 rows a frame for one site of four at 10 million results, 2 s a page).
    """
    row_by_row = row_by_row or in_frame

    def ids_of(column: Any) -> Any:
        return column + literal_column("0") if in_frame else column

    conds: list[Any] = []
    if f.site or f.device:
        q = select(Device.id).join(Device.site)
        if f.site:
            q = q.where(Site.name == f.site)
        if f.device:
            q = q.where(Device.name == f.device)
        ids = _ids(session, q)
        if not ids:
            return None
        conds.append(_match(ids_of(R.device_id), ids))
    if f.station:
        q = select(Station.id).where(Station.name == f.station)
        if f.site:
            q = q.join(Station.site).where(Site.name == f.site)
        ids = _ids(session, q)
        if not ids:
            return None
        conds.append(_match(ids_of(R.station_id), ids))
    if f.cls:
        ids = _ids(session, select(ProductClass.id).where(ProductClass.name == f.cls))
        if not ids:
            return None
        conds.append(_match(ids_of(R.class_id), ids))
    if f.verdict:
        # inlined, not bound: a generic plan must still match the partial index on anomalies
        conds.append(R.verdict == bindparam(None, f.verdict, String, literal_execute=True))
    if f.image:
        conds.append(R.thumbnail_sha == f.image)
    if f.since:
        conds += [R.ts >= f.since, R.id >= ulid_floor(f.since)]
    if f.until:
        conds += [R.ts < f.until, R.id < ulid_floor(f.until + ID_AFTER_CAPTURE)]
    reviewed = select(Review.id).where(Review.result_id == R.id)
    if row_by_row:  # OFFSET 0 keeps the planner from turning it into a join
        reviewed = reviewed.offset(literal_column("0"))
    if f.review == "unreviewed":
        conds.append(~reviewed.exists())
    elif f.review == "reviewed":
        conds.append(reviewed.exists())
    elif f.review in REVIEW_LABELS:
        latest = select(func.max(Review.id)).group_by(Review.result_id)
        conds.append(
            R.id.in_(
                select(Review.result_id).where(Review.id.in_(latest), Review.label == f.review)
            )
        )
    return conds


def view_of(row: Any) -> ResultView:
    """A row of `base_query` as a ResultView."""
    r, site, device, station, cls, review = row
    return ResultView(
        id=r.id,
        ts=r.ts,
        received_at=r.received_at,
        site=site,
        device=device,
        station=station,
        cls=cls,
        model_version=r.model_version,
        score=r.score,
        norm_score=r.norm_score,
        threshold=r.threshold,
        verdict=r.verdict,
        latency_ms=r.latency_ms,
        heatmap_sha=r.heatmap_sha,
        thumbnail_sha=r.thumbnail_sha,
        frame_sha=r.frame_sha,
        source=r.source,
        crops=tuple(CropView(c.idx, c.x, c.y, c.w, c.h, c.score, c.image_sha) for c in r.crops),
        review=review,
    )
