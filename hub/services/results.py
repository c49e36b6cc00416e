"""Results: filtered pages (newest first or highest score first), a frame's repeats folded into one
entry, one result, the live feed.

Pages use keyset pagination (`before` names the last row shown), so the
hundredth page costs what the first does. The filter, its WHERE clauses and
the row views are in `hub.services.result_query`; the reads here order, page
and fold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, exists, func, literal, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from hub.db.models import Result
# the filter's vocabulary, which the views and the OpenAPI document import from here
from hub.services.result_query import REVIEW_STATES as REVIEW_STATES
from hub.services.result_query import SORTS as SORTS
from hub.services.result_query import (
    ResultFilter,
    ResultView,
    base_query,
    conditions,
    cursor_of,
    parse_cursor,
    view_of,
)
from hub.store import Images, StoredImage, is_sha

LIVE_OVERLAP = timedelta(seconds=10)  # transactions commit out of order; look back this far
MAX_REPEATS = 1000  # results one review of a frame's repeats covers at most (oldest first), and a group counts
MAX_FOLDED_FRAMES = 200  # different frames among anomalies that pages fold by looking up each one
FOLD_WINDOW = 1000  # rows a page of groups folds at most, past that many frames
ALL_RESULTS = ResultFilter()  # the default filter: every result, newest first (frozen: one serves all)


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


# -- reading ------------------------------------------------------------------------


def latest_results(session: Session, f: ResultFilter = ALL_RESULTS) -> ResultPage:
    """One page of results matching `f`, newest first or highest score first."""
    conds = conditions(session, f)
    if conds is None:
        return ResultPage([], None)
    return _page(session, f, conds)


def _page(session: Session, f: ResultFilter, conds: list[Any]) -> ResultPage:
    stmt = base_query().where(*conds)
    if f.sort == "score":
        if f.before:
            score, rid = parse_cursor(f.before, "score")
            stmt = stmt.where(tuple_(Result.score, Result.id) < tuple_(score, rid))
        stmt = stmt.order_by(Result.score.desc(), Result.id.desc())
    else:
        if f.before:
            stmt = stmt.where(Result.id < f.before)
        stmt = stmt.order_by(Result.id.desc())
    rows = session.execute(stmt.limit(f.limit + 1)).all()
    items = [view_of(row) for row in rows[: f.limit]]
    more = len(rows) > f.limit
    return ResultPage(items, cursor_of(items[-1], f.sort) if more else None)


def grouped_results(session: Session, f: ResultFilter = ALL_RESULTS) -> GroupPage:
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
        score, rid = parse_cursor(f.before, "score")
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
    return ResultPage(items, cursor_of(items[-1], f.sort) if len(rows) > f.limit else None)


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
        return ResultPage(items, cursor_of(items[-1], f.sort))
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
        ahead = tuple_(Result.score, Result.id) >= tuple_(*parse_cursor(f.before, "score"))
    else:
        ahead = Result.id >= f.before
    probes = [exists().where(Result.thumbnail_sha == sha, *conds, ahead) for sha in shas]
    return {sha for sha, found in zip(shas, session.execute(select(*probes)).one(), strict=True) if found}


def _views(session: Session, ids: list[str]) -> list[ResultView]:
    """The results named by `ids`, in that order."""
    if not ids:
        return []
    by_id = {v.id: v for v in map(view_of, session.execute(base_query().where(Result.id.in_(ids))))}
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
    row = session.execute(base_query().where(Result.id == result_id)).one_or_none()
    return view_of(row) if row else None


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
        base_query()
        .where(*conds, Result.received_at > received_after - LIVE_OVERLAP)
        .order_by(Result.received_at.desc(), Result.id.desc())
        .limit(limit)
    )
    return [view_of(row) for row in reversed(session.execute(stmt).all())]


def image(store: Images, sha: str) -> StoredImage | None:
    """The stored image named `sha` (heat map, thumbnail, frame or crop), or None."""
    return store.get(sha) if is_sha(sha) else None
