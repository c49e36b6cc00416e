"""Review: operators mark anomalies "defect confirmed" or "false alarm", with a note.

The queue lists unreviewed anomalies, highest score first; the history lists
every judgement. Reviewed false alarms are the trainer's new normal images
(`/api/training-data`, `kdfleet hub export-training`).
"""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.db.models import REVIEW_LABELS
from hub.services import results, reviews
from hub.services.common import NotFound, QueryError
from hub.services.results import ResultFilter
from hub.web.auth import current, requires
from hub.web.db import get_session
from hub.web.format import label
from hub.web.params import result_id as checked_result_id
from hub.web.results import filter_choices

bp = Blueprint("review", __name__, url_prefix="/review")
PAGE = 20


@bp.get("/")
def index() -> ResponseReturnValue:
    args = request.args.to_dict()
    args.setdefault("limit", str(PAGE))
    try:
        f = ResultFilter.from_query(
            args, default_sort="score", verdict="anomaly", review="unreviewed"
        )
        error = None
    except QueryError as exc:
        f = ResultFilter(verdict="anomaly", review="unreviewed", sort="score", limit=PAGE)
        error = str(exc)
    session = get_session()
    page = results.latest_results(session, f) if error is None else None
    body = render_template(
        "review/index.html",
        page=page,
        f=f,
        error=error,
        counts=reviews.review_counts(session),
        **filter_choices(),
    )
    return body, 400 if error else 200


@bp.get("/history")
def history() -> ResponseReturnValue:
    label = request.args.get("label") or None
    before = request.args.get("before") or None
    if label is not None and label not in REVIEW_LABELS:
        abort(400, f"label must be one of {', '.join(REVIEW_LABELS)}, not {label!r}")
    if before is not None and not before.isdigit():
        abort(400, f"before must be a review id, not {before!r}")
    page = reviews.list_reviews(
        get_session(), label=label, before=int(before) if before else None, limit=PAGE
    )
    return render_template("review/history.html", page=page, label=label, labels=REVIEW_LABELS)


def _back(result_id: str) -> str:
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("results.detail", result_id=result_id)


@bp.post("/<result_id>")
@requires("operator")
def submit(result_id: str) -> ResponseReturnValue:
    principal = current()
    assert principal is not None
    checked_result_id(result_id)
    session = get_session()
    try:
        reviews.add_review(
            session,
            result_id,
            request.form.get("label", ""),
            request.form.get("note", ""),
            user_id=principal.id if principal.kind == "user" else None,
        )
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    flash(f"Result {result_id} marked: {label(request.form['label'])}.", "ok")
    return redirect(_back(result_id))
