"""Charts: anomaly rate per station over time, score distributions per class with the
threshold, and score drift against each class's reference distribution (server-drawn SVG)."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.services import charts, devices
from hub.services.common import WINDOWS, NotFound, QueryError
from hub.web.auth import requires
from hub.web.db import get_session
from hub.web.svg import Line, distributions, histogram, legend, line_chart

bp = Blueprint("charts", __name__, url_prefix="/charts")


@bp.get("/")
def index() -> ResponseReturnValue:
    session = get_session()
    site = request.args.get("site") or None
    try:
        chosen = request.args.get("window")
        w = charts.window(chosen) if chosen else charts.data_window(session, site=site)
    except QueryError as exc:
        abort(400, str(exc))
    rate = charts.anomaly_rate(session, w, site=site)
    lines = rate_lines(rate)
    hists = charts.score_histograms(session, w, site=site)
    drifts = charts.drift(session, w, site=site)
    return render_template(
        "charts/index.html",
        w=w,
        windows=list(WINDOWS),
        chosen=bool(chosen),
        site=site,
        sites=devices.site_names(session),
        rate=rate,
        rate_chart=line_chart(lines, w.start, w.end, y_label="anomaly rate", percent=True),
        rate_legend=legend(lines),
        histograms=[
            (h, histogram(h.lo, h.width, h.ok, h.anomaly, h.threshold, label=f"scores of {h.cls}"))
            for h in hists
        ],
        drifts=[
            (d, distributions(d.lo, d.width, d.reference, d.current, label=f"score drift of {d.cls}"))
            for d in drifts
        ],
    )


def rate_lines(rate: charts.RateChart) -> list[Line]:
    """One line per station, in the station's own colour."""
    return [
        Line(
            s.station,
            [(p.start, p.rate, f"{p.rate:.1%} ({p.anomalies} of {p.results})") for p in s.points],
            s.rank,
        )
        for s in rate.series
    ]


@bp.post("/reference")
@requires("admin")
def reference() -> ResponseReturnValue:
    """Pin the window shown as a class's drift reference, or go back to the preceding period."""
    cls = request.form.get("cls", "")
    session = get_session()
    try:
        if request.form.get("action") == "clear":
            charts.set_reference(session, cls, None, None)
            message = f"{cls}: drift is compared with the preceding period again."
        else:
            w = charts.window(request.form.get("window"))
            charts.set_reference(session, cls, w.start, w.end)
            message = f"{cls}: the last {w.name} is now the drift reference."
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    flash(message, "ok")
    return redirect(url_for("charts.index", window=request.form.get("window") or None))
