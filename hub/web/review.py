"""Review: operators mark anomalies "defect confirmed" or "false alarm", with a note.

The queue lists unreviewed anomalies, highest score first, a frame seen again
and again once (its review covers all its repeats), with bulk actions on a
selection; the history lists every judgement. Reviewed false alarms are the
trainer's new normal images: their page shows them, its export button gives
them as JSON (as `/api/training-data` does, every page at once), and
`kdfleet hub export-training` writes them as a data set.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from shared.vocabulary import REVIEW_LABELS
from hub.services import devices, results, reviews
from hub.services.common import MAX_PAGE, QueryError, now_utc
from hub.services.results import ResultFilter
from hub.web.api import plain, review_json, training_query
from hub.web.auth import current, requires
from hub.web.db import get_session
from hub.web.format import label
from hub.web.params import result_id as checked_result_id
from hub.web.results import filter_choices

bp = Blueprint("review", __name__, url_prefix="/review")
PAGE = 20
MAX_EXPORT = 100_000  # items one export holds at most


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
    page = results.grouped_results(session, f) if error is None else None
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


def _back(result_id: str | None) -> str:
    """The form's `next` page (on this site only), else the result's page, else the queue."""
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("results.detail", result_id=result_id) if result_id else url_for("review.index")


def _scope() -> ResultFilter:
    """The unreviewed anomalies the queue's filters (sent along with the form) let through: the repeats
    its counts were made over."""
    try:
        return ResultFilter.from_query(request.form, verdict="anomaly", review="unreviewed")
    except QueryError as exc:
        abort(400, str(exc))


def _record(result_ids: list[str], what: str) -> ResponseReturnValue:
    """Record the form's label and note on `result_ids`, flash how many, and go back."""
    principal = current()
    assert principal is not None
    session = get_session()
    try:
        n = reviews.add_reviews(
            session,
            result_ids,
            request.form.get("label", ""),
            request.form.get("note", ""),
            user_id=principal.id if principal.kind == "user" else None,
        )
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    flash(f"{what} marked: {label(request.form['label'])}" + (f" ({n} results)." if n > 1 else "."), "ok")
    return redirect(_back(result_ids[0]))


@bp.post("/<result_id>")
@requires("operator")
def submit(result_id: str) -> ResponseReturnValue:
    """One result; with `repeats`, every unreviewed anomaly showing the same frame as well."""
    checked_result_id(result_id)
    session = get_session()
    if results.result_detail(session, result_id) is None:
        abort(404, f"no result with id {result_id!r}")
    ids = [result_id]
    if request.form.get("repeats"):
        ids = list(dict.fromkeys([result_id, *results.repeats_of(session, [result_id], _scope())]))
    return _record(ids, f"Result {result_id}" + (" and its repeats" if len(ids) > 1 else ""))


@bp.post("/bulk")
@requires("operator")
def bulk() -> ResponseReturnValue:
    """The entries selected on the queue, each with the unreviewed repeats of its frame."""
    chosen = [checked_result_id(rid) for rid in request.form.getlist("result")]
    if not chosen:
        flash("Select the entries to mark first (the box beside each).", "error")
        return redirect(_back(None))
    ids = list(dict.fromkeys(chosen + results.repeats_of(get_session(), chosen, _scope())))
    return _record(ids, f"{len(chosen)} selected entr{'y' if len(chosen) == 1 else 'ies'}")


@bp.get("/training-data")
def training() -> ResponseReturnValue:
    """False alarms (or confirmed defects) as the trainer takes them: the frames, their notes, the export."""
    query = training_query()
    page = reviews.training_data(get_session(), **query)
    args = {k: v for k, v in query.items() if k in ("label", "cls") and v}
    return render_template("review/training.html", page=page, args=args, labels=REVIEW_LABELS,
                           classes=devices.class_names(get_session()))


@bp.get("/training-data/export")
def training_export() -> ResponseReturnValue:
    """Every item of the training data (not one page) as a JSON file to download."""
    query = training_query()
    query.pop("before", None)
    session = get_session()
    items, before = [], None
    while len(items) < MAX_EXPORT:
        page = reviews.training_data(session, **query | {"before": before, "limit": MAX_PAGE})
        items += [review_json(v) for v in page.items]
        if page.next_before is None:
            break
        before = page.next_before
    items = items[:MAX_EXPORT]
    body = json.dumps({"label": query["label"], "cls": query["cls"], "exported_at": plain(now_utc()),
                       "count": len(items), "items": items}, indent=2)
    name = f"training-data-{query['label']}{'-' + query['cls'] if query['cls'] else ''}.json"
    return Response(body, mimetype="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
