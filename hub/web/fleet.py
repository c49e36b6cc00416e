"""Fleet: every device with its online state, model, throughput and when it was last heard;
one page per device."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, abort, current_app, render_template, request
from flask.typing import ResponseReturnValue

from hub.services import charts, devices, results
from hub.web.charts import rate_lines
from hub.web.db import get_session
from hub.web.svg import Box, legend, line_chart

bp = Blueprint("fleet", __name__)


def silent_after() -> timedelta:
    return timedelta(seconds=current_app.config["HUB_SILENT_AFTER_S"])


@bp.get("/")
def index() -> ResponseReturnValue:
    session = get_session()
    site = request.args.get("site") or None
    return render_template(
        "fleet/index.html",
        devices=devices.list_devices(session, site=site, silent_after=silent_after()),
        summary=devices.fleet_summary(session, silent_after=silent_after()),
        sites=devices.site_names(session),
        site=site,
        refresh_s=current_app.config["HUB_REFRESH_S"],
    )


@bp.get("/devices/<site>/<name>")
def device(site: str, name: str) -> ResponseReturnValue:
    session = get_session()
    found = devices.device_detail(session, site, name, silent_after=silent_after())
    if found is None:
        abort(404, f"no device {name!r} at site {site!r}; it appears once it sends a message")
    activity = devices.device_activity(session, site, name)
    recent = results.latest_results(session, results.ResultFilter(site=site, device=name, limit=12))
    w = charts.data_window(session, site=site, device=name)
    rate = charts.anomaly_rate(session, w, site=site, device=name)
    lines = rate_lines(rate)
    return render_template(
        "fleet/device.html",
        d=found,
        activity=activity,
        recent=recent.items,
        window=w,
        chart=line_chart(lines, w.start, w.end, y_label="anomaly rate", percent=True, box=Box(640, 280)),
        legend=legend(lines) if len(lines) > 1 else None,
    )
