"""Results: the latest inspections with their heat maps, thumbnails and crops, filterable;
one result with its reviews."""

from __future__ import annotations

from flask import Blueprint, abort, render_template, request
from flask.typing import ResponseReturnValue

from shared.vocabulary import VERDICTS
from hub.services import devices, results, reviews
from hub.services.common import QueryError
from hub.services.results import REVIEW_STATES, ResultFilter
from hub.web.db import get_session
from hub.web.params import result_id as checked_result_id

bp = Blueprint("results", __name__, url_prefix="/results")


def filter_choices() -> dict[str, object]:
    """What the filter form offers: sites, stations, classes, verdicts, review states."""
    session = get_session()
    return {
        "sites": devices.site_names(session),
        "stations": devices.station_names(session),
        "classes": devices.class_names(session),
        "verdicts": VERDICTS,
        "review_states": REVIEW_STATES,
    }


@bp.get("/")
def index() -> ResponseReturnValue:
    try:
        f, error = ResultFilter.from_query(request.args), None
    except QueryError as exc:
        f, error = ResultFilter(), str(exc)
    page = results.latest_results(get_session(), f) if error is None else None
    body = render_template("results/index.html", page=page, f=f, error=error, **filter_choices())
    return body, 400 if error else 200


@bp.get("/<result_id>")
def detail(result_id: str) -> ResponseReturnValue:
    session = get_session()
    result = results.result_detail(session, checked_result_id(result_id))
    if result is None:
        abort(404, f"no result with id {result_id!r}; it may not have reached the hub yet")
    return render_template(
        "results/detail.html", r=result, reviews=reviews.reviews_of(session, result_id)
    )
