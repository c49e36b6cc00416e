"""Live results: the newest inspections as they arrive, through server-sent events.

The page renders the latest matching results, then static/live.js opens
``/live/stream`` with the same filters. The stream polls the database every
``HUB_LIVE_POLL_S`` seconds (so it sees what any ingest process stored, not
only its own), sends each new result once as an ``event: result`` with its
receive time as the event id, and ends after ``HUB_LIVE_MAX_S`` seconds; the
browser reconnects on its own and resumes from ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, Response, abort, current_app, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.services import results
from hub.services.common import WINDOWS, QueryError, now_utc, parse_time
from hub.services.results import LIVE_OVERLAP, ResultFilter, ResultView
from hub.web.db import close_session, get_db, get_session
from hub.web.results import filter_choices

bp = Blueprint("live", __name__, url_prefix="/live")
LIVE_WINDOWS = ("15m", "1h", "8h", "24h")
KEEPALIVE_S = 15.0  # a comment line this often finds a closed connection and keeps proxies open


def _filter(args: dict[str, str]) -> tuple[ResultFilter, str]:
    """The filter for the page and the stream; `window` becomes `since` (default 1h)."""
    name = args.pop("window", "") or "1h"
    if name not in LIVE_WINDOWS:
        raise QueryError(f"window must be one of {', '.join(LIVE_WINDOWS)}, not {name!r}")
    args.pop("since", None)
    f = ResultFilter.from_query(args, since=now_utc() - WINDOWS[name])
    return f, name


@bp.get("/")
def index() -> ResponseReturnValue:
    args = request.args.to_dict()
    try:
        f, window_name = _filter(args)
        error = None
    except QueryError as exc:
        f, window_name, error = ResultFilter(), "1h", str(exc)
    page = results.latest_results(get_session(), f) if error is None else None
    newest = max((r.received_at for r in page.items), default=None) if page else None
    body = render_template(
        "live/index.html",
        page=page,
        f=f,
        error=error,
        window=window_name,
        windows=LIVE_WINDOWS,
        after=(newest or now_utc()).isoformat(),
        **filter_choices(),
    )
    return body, 400 if error else 200


def event_payload(r: ResultView, image_base: str, result_base: str) -> dict[str, Any]:
    """What the live page needs to draw one row."""
    return {
        "id": r.id,
        "url": result_base + r.id,
        "ts": r.ts.isoformat(),
        "received_at": r.received_at.isoformat(),
        "site": r.site,
        "device": r.device,
        "station": r.station,
        "cls": r.cls,
        "source": r.source,
        "verdict": r.verdict,
        "score": r.score,
        "norm_score": r.norm_score,
        "threshold": r.threshold,
        "model_version": r.model_version,
        "crops": len(r.crops),
        "review": r.review,
        "thumbnail_url": image_base + r.thumbnail_sha if r.thumbnail_sha else None,
        "heatmap_url": image_base + r.heatmap_sha if r.heatmap_sha else None,
    }


@bp.get("/stream")
def stream() -> ResponseReturnValue:
    args = request.args.to_dict()
    resume = request.headers.get("Last-Event-ID") or args.pop("after", "")
    args.pop("after", None)
    try:
        f = ResultFilter.from_query(args | {"limit": "200"})
        cursor = parse_time(resume, "Last-Event-ID") if resume else now_utc()
    except QueryError as exc:
        abort(400, str(exc))
    db = get_db()
    poll_s = float(current_app.config["HUB_LIVE_POLL_S"])
    max_s = float(current_app.config["HUB_LIVE_MAX_S"])
    image_base = url_for("images.get", sha="x")[:-1]
    result_base = url_for("results.detail", result_id="x")[:-1]
    close_session()  # the stream opens a short session per poll; none is held while it waits

    def events() -> Iterator[str]:
        nonlocal cursor
        floor = cursor  # the page (or the previous stream) showed everything received until then
        sent: dict[str, datetime] = {}  # id -> received_at, forgotten once outside the overlap
        yield f"retry: {int(poll_s * 1000) + 1000}\n\n"
        deadline = time.monotonic() + max_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            with db.session() as session:
                found = results.live_results(session, f, cursor)
            for r in found:
                if r.id in sent or r.received_at <= floor:
                    continue
                sent[r.id] = r.received_at
                cursor = max(cursor, r.received_at)
                data = json.dumps(event_payload(r, image_base, result_base))
                yield f"id: {cursor.isoformat()}\nevent: result\ndata: {data}\n\n"
                quiet_since = time.monotonic()
            horizon = cursor - LIVE_OVERLAP - timedelta(seconds=1)
            for rid in [rid for rid, at in sent.items() if at < horizon]:
                del sent[rid]
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            time.sleep(poll_s)

    return Response(
        events(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
