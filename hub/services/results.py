"""Results: filtered pages (newest first or highest score first), one result, the live feed.

Pages use keyset pagination (`before` names the last row shown), so the
hundredth page costs what the first does. Name filters (site, device,
station, class) are resolved to ids first, which lets the database walk the
one index that serves the filter in the order the page wants. Time filters
also bound the result id: ULIDs are made when the agent scores a frame, a
moment after its capture, so ``ts >= since`` implies an id made at or after
``since`` (an index range on the primary key instead of a scan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, bindparam, exists, func, literal, literal_column, or_, select, tuple_
from sqlalchemy.orm import Session, aliased, selectinload

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
from hub.store import Images, StoredImage, is_sha
from shared.vocabulary import REVIEW_LABELS, VERDICTS

SORTS = ("newest", "score")
REVIEW_STATES = ("unreviewed", "reviewed", *REVIEW_LABELS)
ID_AFTER_CAPTURE = timedelta(minutes=10)  # longest an agent takes from capture to making the id
LIVE_OVERLAP = timedelta(seconds=10)  # transactions commit out of order; look back this far
MAX_REPEATS = 1000  # results one review of a frame's repeats covers at most (oldest first), and a group counts
MAX_FOLDED_FRAMES = 200  # different frames among anomalies that pages fold by looking up each one
FOLD_WINDOW = 1000  # rows a page of groups folds at most, past that many frames


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
class ResultPage:
    items: list[ResultView]
    next_before: str | None  # pass as `before` for the next page; None on the last page


@dataclass(frozen=True, slots=True)
class ResultGroup:
    """The results that show one frame: the one shown, how many match, when the first and last were made."""

    result: ResultView
    count: int  # at most MAX_REPEATS
    more: bool  # more than MAX_REPEATS match
    first_ts: datetime
    last_ts: datetime


@dataclass(frozen=True, slots=True)
class GroupPage:
    items: list[ResultGroup]
    next_before: str | None  # as ResultPage's


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
            _parse_cursor(v["before"], sort)
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


def _parse_cursor(cursor: str, sort: str) -> tuple[float, str] | str:
    if sort == "newest":
        return check_ulid(cursor, "before")
    score, _, rid = cursor.partition("~")
    try:
        return float(score), check_ulid(rid, "before")
    except ValueError:
        raise QueryError(
            f"before must be '<score>~<result id>' when sorting by score, not {cursor!r}"
        ) from None


def _cursor(r: ResultView, sort: str) -> str:
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


def _base() -> Select[Any]:
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


def _view(row: Any) -> ResultView:
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


# -- reading ------------------------------------------------------------------------


def latest_results(session: Session, f: ResultFilter = ResultFilter()) -> ResultPage:
    """One page of results matching `f`, newest first or highest score first."""
    conds = conditions(session, f)
    if conds is None:
        return ResultPage([], None)
    return _page(session, f, conds)


def _page(session: Session, f: ResultFilter, conds: list[Any]) -> ResultPage:
    stmt = _base().where(*conds)
    if f.sort == "score":
        if f.before:
            score, rid = _parse_cursor(f.before, "score")
            stmt = stmt.where(tuple_(Result.score, Result.id) < tuple_(score, rid))
        stmt = stmt.order_by(Result.score.desc(), Result.id.desc())
    else:
        if f.before:
            stmt = stmt.where(Result.id < f.before)
        stmt = stmt.order_by(Result.id.desc())
    rows = session.execute(stmt.limit(f.limit + 1)).all()
    items = [_view(row) for row in rows[: f.limit]]
    more = len(rows) > f.limit
    return ResultPage(items, _cursor(items[-1], f.sort) if more else None)


def grouped_results(session: Session, f: ResultFilter = ResultFilter()) -> GroupPage:
    """Like `latest_results`, with the repeats of a frame folded into one entry.

    A frame is the same when its thumbnail is (the same sha256: a replayed file, a part left in
    front of the camera); each group shows its first row in the page's order (the newest, or the
    highest score) and counts the results of that frame that match `f` (at most MAX_REPEATS, then
    `more` is set); its first and last times are those of its oldest and newest result. Results
    without a thumbnail stay alone.

    The cost does not grow with the repeats: among anomalies with at most MAX_FOLDED_FRAMES
    different frames (a looping camera, a demo source), each frame's first row is found by one
    index probe; with more frames, the page folds a window of at most FOLD_WINDOW rows past
    `before`, and when repeats fill that window it shows fewer entries and links on.
    """
    conds = conditions(session, f, row_by_row=True)  # every query below stops early, in an index's order
    in_frame = conditions(session, f, in_frame=True)
    if conds is None or in_frame is None:
        return GroupPage([], None)
    firsts = _first_of_each_frame(session, f, in_frame) if f.verdict == "anomaly" else None
    page = _folded_window(session, f, conds, in_frame) if firsts is None else _merged(session, f, conds, firsts)
    counts = _counts(session, in_frame, [r for r in page.items if r.thumbnail_sha])
    groups = [
        ResultGroup(r, *counts.get(r.thumbnail_sha or "", (1, False, r.ts, r.ts))) for r in page.items
    ]
    return GroupPage(groups, page.next_before)


def _anomaly(R: Any = Result) -> Any:
    # inlined, not bound: the partial indexes on anomalies serve only a literal 'anomaly'
    return R.verdict == bindparam(None, "anomaly", String, literal_execute=True)


def _frames() -> Any:
    """The different thumbnails among anomalies, MAX_FOLDED_FRAMES + 1 at most, as a recursive CTE:
    a walk along the thumbnail index, one probe per frame however many results show it."""
    step = aliased(Result)
    frames = select(func.min(Result.thumbnail_sha).label("sha"), literal(1).label("n")).where(_anomaly())
    frames = frames.cte("frames", recursive=True)
    following = (
        select(func.min(step.thumbnail_sha))
        .where(_anomaly(step), step.thumbnail_sha > frames.c.sha)
        .scalar_subquery()
    )
    return frames.union_all(
        select(following, frames.c.n + 1).where(frames.c.sha.is_not(None), frames.c.n <= MAX_FOLDED_FRAMES)
    )


def _of_frame(sha: Any) -> list[Any]:
    """The rows of the frame `sha` names, for a subquery run once per frame that orders them.

    Written as a range, not `thumbnail_sha = sha`: an equality makes the frame a constant of the
    generic plan, which then may order by the anomalies' id or score index alone and walk every
    anomaly of a month that lacks a rare frame (10 ms a frame at a million results); a range
    keeps the frame in the order, which only the thumbnail indexes give.
    """
    return [Result.thumbnail_sha >= sha, Result.thumbnail_sha <= sha]


def _first_of_each_frame(session: Session, f: ResultFilter, conds: list[Any]) -> list[str] | None:
    """Each frame's first row matching `conds` in the page's order (one index probe per frame, planned
    once), or None when the anomalies show more than MAX_FOLDED_FRAMES frames."""
    frames = _frames()
    first = (
        select(Result.id).where(*_of_frame(frames.c.sha), *conds)
        .order_by(Result.thumbnail_sha.desc(), *_order(f)).limit(1)
        .correlate(frames).scalar_subquery()
    )  # fmt: skip
    rows = session.execute(select(frames.c.sha, first).where(frames.c.sha.is_not(None))).all()
    if len(rows) > MAX_FOLDED_FRAMES:
        return None
    return [rid for _, rid in rows if rid is not None]


def _order(f: ResultFilter, R: Any = Result) -> list[Any]:
    return [R.score.desc(), R.id.desc()] if f.sort == "score" else [R.id.desc()]


def _after_cursor(f: ResultFilter, R: Any = Result) -> list[Any]:
    if f.before is None:
        return []
    if f.sort == "score":
        score, rid = _parse_cursor(f.before, "score")
        return [tuple_(R.score, R.id) < tuple_(score, rid)]
    return [R.id < f.before]


def _merged(session: Session, f: ResultFilter, conds: list[Any], firsts: list[str]) -> ResultPage:
    """A page of groups when the anomalies show few frames: those of the frames' first rows past the
    cursor and the rows without a thumbnail, merged in the page's order."""
    keys = select(Result.id, Result.score)
    rows = list(session.execute(keys.where(Result.id.in_(firsts), *_after_cursor(f)))) if firsts else []
    rows += session.execute(
        keys.where(*conds, Result.thumbnail_sha.is_(None), *_after_cursor(f))
        .order_by(*_order(f))
        .limit(f.limit + 1)
    ).all()
    rows.sort(key=(lambda r: (r.score, r.id)) if f.sort == "score" else (lambda r: r.id), reverse=True)
    items = _views(session, [r.id for r in rows[: f.limit]])
    return ResultPage(items, _cursor(items[-1], f.sort) if len(rows) > f.limit else None)


def _folded_window(session: Session, f: ResultFilter, conds: list[Any], in_frame: list[Any]) -> ResultPage:
    """A page of groups among many frames: the first FOLD_WINDOW matching rows past the cursor, each
    frame's first of them kept unless a matching row of that frame comes before the cursor (it was
    on an earlier page). When repeats fill the window, the page is short and links on past it."""
    window = session.execute(
        select(Result.id, Result.score, Result.thumbnail_sha).where(*conds, *_after_cursor(f))
        .order_by(*_order(f)).limit(FOLD_WINDOW)
    ).all()  # fmt: skip
    seen: set[str] = set()
    firsts = []
    for row in window:
        if row.thumbnail_sha is None or row.thumbnail_sha not in seen:
            firsts.append(row)
            seen.add(row.thumbnail_sha)
    kept: list[Any] = []
    for start in range(0, len(firsts), f.limit + 1):
        chunk = firsts[start : start + f.limit + 1]
        earlier = _shown_before(session, f, in_frame, [r.thumbnail_sha for r in chunk if r.thumbnail_sha])
        kept += [r for r in chunk if r.thumbnail_sha not in earlier]
        if len(kept) > f.limit:
            break
    items = _views(session, [r.id for r in kept[: f.limit]])
    if len(kept) > f.limit:
        return ResultPage(items, _cursor(items[-1], f.sort))
    if len(window) < FOLD_WINDOW:
        return ResultPage(items, None)
    last = window[-1]
    return ResultPage(items, last.id if f.sort == "newest" else f"{last.score!r}~{last.id}")


def _shown_before(session: Session, f: ResultFilter, conds: list[Any], shas: list[str]) -> set[str]:
    """Those of `shas` with a matching row up to the cursor (on an earlier page, or in an earlier
    window): one index probe each."""
    if f.before is None or not shas:
        return set()
    if f.sort == "score":
        ahead = tuple_(Result.score, Result.id) >= tuple_(*_parse_cursor(f.before, "score"))
    else:
        ahead = Result.id >= f.before
    probes = [exists().where(Result.thumbnail_sha == sha, *conds, ahead) for sha in shas]
    return {sha for sha, found in zip(shas, session.execute(select(*probes)).one(), strict=True) if found}


def _views(session: Session, ids: list[str]) -> list[ResultView]:
    """The results named by `ids`, in that order."""
    if not ids:
        return []
    by_id = {v.id: v for v in map(_view, session.execute(_base().where(Result.id.in_(ids))))}
    return [by_id[rid] for rid in ids]


def _counts(
    session: Session, conds: list[Any], firsts: list[ResultView]
) -> dict[str, tuple[int, bool, datetime, datetime]]:
    """For the frame of each of `firsts`: how many results match (at most MAX_REPEATS), whether more
    do, the capture times of its oldest and newest matching result (subqueries planned once, run
    per frame on its index)."""
    if not firsts:
        return {}
    shown = aliased(Result)
    matching = select(Result.id).where(Result.thumbnail_sha == shown.thumbnail_sha, *conds).correlate(shown)
    counted = select(func.count()).select_from(matching.limit(MAX_REPEATS + 1).subquery()).scalar_subquery()
    edge = select(Result.ts).where(*_of_frame(shown.thumbnail_sha), *conds).limit(1).correlate(shown)
    rows = session.execute(
        select(shown.thumbnail_sha, counted, edge.order_by(Result.thumbnail_sha, Result.id).scalar_subquery(),
               edge.order_by(Result.thumbnail_sha.desc(), Result.id.desc()).scalar_subquery())
        .where(shown.id.in_([r.id for r in firsts]))
    )  # fmt: skip
    return {sha: (min(n, MAX_REPEATS), n > MAX_REPEATS, first, last) for sha, n, first, last in rows}


def repeats_of(session: Session, result_ids: list[str], f: ResultFilter) -> list[str]:
    """The ids of every result matching `f` that shows the same frame as one of `result_ids` (those
    included, when they match), oldest first; at most MAX_REPEATS."""
    conds = conditions(session, f)
    if conds is None or not result_ids:
        return []
    shas = select(Result.thumbnail_sha).where(Result.id.in_(result_ids), Result.thumbnail_sha.is_not(None))
    same = or_(Result.id.in_(result_ids), Result.thumbnail_sha.in_(shas))
    stmt = select(Result.id).where(*conds, same).order_by(Result.id).limit(MAX_REPEATS)
    return list(session.scalars(stmt))


def result_detail(session: Session, result_id: str) -> ResultView | None:
    """One result with its crops and review state, or None when no result has that id."""
    row = session.execute(_base().where(Result.id == result_id)).one_or_none()
    return _view(row) if row else None


def live_results(
    session: Session, f: ResultFilter, received_after: datetime, limit: int = 200
) -> list[ResultView]:
    """The newest `limit` results matching `f` received after `received_after`, oldest first.

    Looks LIVE_OVERLAP further back, since a transaction that began earlier
    may commit later: the caller skips the ids it has already sent. When more
    than `limit` arrived, the older ones are left out: the feed is for people.
    """
    conds = conditions(session, f)
    if conds is None:
        return []
    stmt = (
        _base()
        .where(*conds, Result.received_at > received_after - LIVE_OVERLAP)
        .order_by(Result.received_at.desc(), Result.id.desc())
        .limit(limit)
    )
    return [_view(row) for row in reversed(session.execute(stmt).all())]


def image(store: Images, sha: str) -> StoredImage | None:
    """The stored image named `sha` (heat map, thumbnail, frame or crop), or None."""
    return store.get(sha) if is_sha(sha) else None
