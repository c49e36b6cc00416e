"""Defect gallery: anomalies as cards, the heat map laid over the frame, crops beneath,
highest scores first (or newest first), filterable like the results; a frame seen again and
again is one card with its count."""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask.typing import ResponseReturnValue

from hub.services import results
from hub.services.common import QueryError
from hub.services.results import ResultFilter
from hub.web.db import get_session
from hub.web.results import filter_choices

bp = Blueprint("gallery", __name__, url_prefix="/gallery")
PAGE = 24


@bp.get("/")
def index() -> ResponseReturnValue:
    args = request.args.to_dict()
    args.setdefault("limit", str(PAGE))
    try:
        f = ResultFilter.from_query(args, default_sort="score", verdict="anomaly")
        error = None
    except QueryError as exc:
        f, error = ResultFilter(verdict="anomaly", sort="score", limit=PAGE), str(exc)
    page = results.grouped_results(get_session(), f) if error is None else None
    body = render_template("gallery/index.html", page=page, f=f, error=error, **filter_choices())
    return body, 400 if error else 200
