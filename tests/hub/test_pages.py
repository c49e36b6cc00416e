"""The dashboard's feature pages: device, live feed (server-sent events), gallery, review,
charts and models, over results seeded through the ingest writer."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from urllib.parse import quote
from datetime import UTC, datetime

from flask import Flask
from flask.testing import FlaskClient

from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope
from hub.services import reviews
from hub.store import ImageStore


def rows(html: str) -> list[str]:
    """The result ids a page links to, in page order, each once."""
    seen: list[str] = []
    for rid in re.findall(r'href="/results/([0-9A-Z]{26})"', html):
        if rid not in seen:
            seen.append(rid)
    return seen


def test_device_page_shows_state_activity_and_latest_results(client: FlaskClient, seeded, site: str) -> None:
    html = client.get(f"/devices/{site}/cam-a").get_data(as_text=True)
    assert "online" in html and "tensorrt" in html and "1.4.0" in html and "st-1" in html
    assert re.search(r'<span class="figure">5</span><span class="label">results, last 24 h', html)
    assert set(rows(html)) == set(seeded)
    assert "<svg" in html and "anomaly rate" in html
    assert client.get(f"/devices/{site}/nope").status_code == 404


def test_a_device_with_a_failing_source_is_shown_in_error_until_it_recovers(
    client: FlaskClient, seeded, site: str, hub_db: Database, store: ImageStore
) -> None:
    from shared import messages

    def report(error: str) -> None:
        metrics = messages.Metrics(device="cam-a", ts=time.time(), fps=0.0, latency_p50_ms=-1.0, latency_p95_ms=-1.0,
                                   frames_dropped=0, spool_depth=0, frames_rejected=3, source_error=error)
        BatchWriter(hub_db, store).write([Envelope(site, "cam-a", metrics, datetime.now(UTC))])

    failing = "/data/line-1: no such file or folder; a source is a folder, a video file, a camera index (0)"
    report(failing)
    fleet = client.get(f"/?site={site}").get_data(as_text=True)
    row = re.search(r'<tr class="device error">(.*?)</tr>', fleet, re.DOTALL)
    assert row and "cam-a" in row.group(1) and f'title="{failing}"' in row.group(1)
    assert re.search(r'<span class="figure">1</span><span class="label">source failing</span>', fleet)
    page = client.get(f"/devices/{site}/cam-a").get_data(as_text=True)
    assert '<span class="state error">error</span>' in page
    assert re.search(r'class="notice error source-error" role="alert">A source of this device is failing.*'
                     rf"<samp>{re.escape(failing)}</samp>", page, re.DOTALL)
    assert re.search(r"<dt>Frames rejected</dt><dd>3 ", page)
    api = client.get(f"/api/devices/{site}/cam-a").get_json()
    assert (api["state"], api["online"], api["source_error"], api["frames_rejected"]) == ("error", True, failing, 3)
    scraped = client.get("/metrics").get_data(as_text=True)
    labels = f'site="{site}",device="cam-a",station="st-1"'
    assert f"kdfleet_device_source_failing{{{labels}}} 1" in scraped
    assert f'kdfleet_device_state{{{labels},state="error"}} 1' in scraped
    assert f"kdfleet_device_online{{{labels}}} 1" in scraped

    report("")   # the source works again
    page = client.get(f"/devices/{site}/cam-a").get_data(as_text=True)
    assert '<span class="state online">online</span>' in page and "source-error" not in page
    assert client.get(f"/api/devices/{site}/cam-a").get_json()["state"] == "online"


def test_results_filter_by_station_class_and_time(client: FlaskClient, seeded, site: str) -> None:
    by = lambda q: set(rows(client.get(f"/results/?site={site}&{q}").get_data(as_text=True)))  # noqa: E731
    assert by("station=st-2") == {rid for rid, r in seeded.items() if r.station == "st-2"}
    assert by("cls=screw") == {rid for rid, r in seeded.items() if r.cls == "screw"}
    assert by("station=nowhere") == set()
    newest = max(seeded.values(), key=lambda r: r.ts)
    since = datetime.fromtimestamp(newest.ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    assert by(f"since={since}") == {newest.id}
    assert newest.id not in by(f"until={since}")
    bad = client.get("/results/?since=yesterday")
    assert bad.status_code == 400 and "ISO 8601" in bad.get_data(as_text=True)


def test_gallery_shows_anomalies_with_overlays_highest_score_first(client: FlaskClient, seeded, site: str) -> None:
    html = client.get(f"/gallery/?site={site}").get_data(as_text=True)
    anomalies = sorted((r for r in seeded.values() if r.verdict == "anomaly"), key=lambda r: -r.score)
    assert rows(html) == [r.id for r in anomalies]
    assert html.count('class="heat"') == 2 and html.count('class="base"') == 2
    newest = client.get(f"/gallery/?site={site}&sort=newest").get_data(as_text=True)
    assert rows(newest) == sorted((r.id for r in anomalies), reverse=True)
    first = client.get(f"/gallery/?site={site}&limit=1").get_data(as_text=True)
    older = re.search(r'href="([^"]*before=[^"]*)">Older', first).group(1).replace("&amp;", "&")
    assert "sort=score" in older and rows(client.get(older).get_data(as_text=True)) == [anomalies[1].id]


def test_review_queue_to_training_data(sign_in, seeded, site: str, hub_db: Database) -> None:
    operator, token = sign_in("operator")
    queue = operator.get(f"/review/?site={site}").get_data(as_text=True)
    anomalies = [rid for rid, r in seeded.items() if r.verdict == "anomaly"]
    assert set(rows(queue)) == set(anomalies)
    first, second = anomalies
    response = operator.post(
        f"/review/{first}",
        data={"label": "false_alarm", "note": "reflection on the cap", "csrf_token": token,
              "next": f"/review/?site={site}"},
    )
    assert response.status_code == 302 and response.headers["Location"] == f"/review/?site={site}"
    operator.post(f"/review/{second}", data={"label": "defect", "csrf_token": token})
    assert rows(operator.get(f"/review/?site={site}").get_data(as_text=True)) == []

    detail = operator.get(f"/results/{first}").get_data(as_text=True)
    assert "false alarm" in detail and "reflection on the cap" in detail
    bad = operator.post(f"/review/{first}", data={"label": "maybe", "csrf_token": token})
    assert bad.status_code == 400 and "label must be one of" in bad.get_data(as_text=True)
    assert operator.post(f"/review/{'0' * 26}", data={"label": "defect", "csrf_token": token}).status_code == 404

    items = operator.get(f"/api/training-data?cls={seeded[first].cls}").get_json()["items"]
    mine = [i for i in items if i["result_id"] == first]
    assert len(mine) == 1 and mine[0]["note"] == "reflection on the cap" and mine[0]["label"] == "false_alarm"
    assert operator.get(mine[0]["image_url"]).data == seeded[first].thumbnail
    assert all(i["result_id"] != second for i in items)
    # a later review supersedes the earlier one
    operator.post(f"/review/{first}", data={"label": "defect", "csrf_token": token})
    items = operator.get("/api/training-data").get_json()["items"]
    assert all(i["result_id"] != first for i in items)
    with hub_db.session() as session:
        assert [v.label for v in reviews.reviews_of(session, first)] == ["defect", "false_alarm"]
    assert "reflection on the cap" in operator.get("/review/history").get_data(as_text=True)


def _events(response, wanted: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
    """Read server-sent events off a streamed response until `wanted` results arrived."""
    events, buffer, deadline = [], "", time.monotonic() + timeout
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            lines = [line for line in block.splitlines() if ": " in line and not line.startswith(":")]
            fields = dict(line.split(": ", 1) for line in lines)
            if fields.get("event") == "result":
                events.append((fields["id"], json.loads(fields["data"])))
        if len(events) >= wanted or time.monotonic() > deadline:
            break
    response.close()
    return events


def test_live_stream_sends_new_results_once_with_filters(
    make_app: Callable[..., Flask], accounts, hub_db: Database, store: ImageStore, site: str, make_result
) -> None:
    from tests.hub.conftest import login

    app = make_app(HUB_LIVE_POLL_S=0.05, HUB_LIVE_MAX_S=5)
    client = app.test_client()
    login(client, accounts("viewer"))
    page = client.get(f"/live/?site={site}&verdict=anomaly").get_data(as_text=True)
    after = re.search(r'data-after="([^"]+)"', page).group(1)
    stream_url = re.search(r'data-stream="([^"]+)"', page).group(1).replace("&amp;", "&")
    assert "verdict=anomaly" in stream_url and f"site={site}" in stream_url

    writer = BatchWriter(hub_db, store)
    sent = [make_result(site, "cam-l", seed=i, verdict=v, crops=1) for i, v in enumerate(["ok", "anomaly", "anomaly"])]
    writer.write([Envelope(site, "cam-l", r, datetime.now(UTC)) for r in sent])
    response = client.get(f"{stream_url}&after={quote(after)}", buffered=False)
    assert response.mimetype == "text/event-stream"
    events = _events(response, 2)
    assert [e["id"] for _, e in events] == [r.id for r in sent if r.verdict == "anomaly"]
    assert all(e["verdict"] == "anomaly" and e["thumbnail_url"].startswith("/images/") for _, e in events)

    # resuming from the last event id sends only what is new
    last_id = events[-1][0]
    later = make_result(site, "cam-l", seed=9, verdict="anomaly", crops=0)
    writer.write([Envelope(site, "cam-l", later, datetime.now(UTC))])
    resumed = client.get(stream_url, headers={"Last-Event-ID": last_id}, buffered=False)
    assert [e["id"] for _, e in _events(resumed, 1)] == [later.id]


def test_charts_draw_rates_distributions_with_threshold_and_drift(client: FlaskClient, seeded, site: str) -> None:
    response = client.get(f"/charts/?site={site}&window=24h")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert html.count("<svg") >= 1 + 2 + 2  # rate, two classes' histograms, two drift charts
    assert 'class="series"' in html or "<circle" in html
    assert 'class="threshold"' in html and "threshold 0.5" in html
    assert 'class="bar anomaly"' in html and 'class="bar ok"' in html
    assert "bottle" in html and "screw" in html and "PSI" in html
    assert client.get("/charts/?window=fortnight").status_code == 400


def test_admin_pins_a_drift_reference(sign_in, seeded, site: str) -> None:
    admin, token = sign_in("admin")
    response = admin.post(
        "/charts/reference", data={"cls": "bottle", "window": "1h", "csrf_token": token}
    )
    assert response.status_code == 302
    html = admin.get(f"/charts/?site={site}&window=1h").get_data(as_text=True)
    assert "(pinned)" in html
    operator, op_token = sign_in("operator")
    assert operator.post("/charts/reference", data={"cls": "bottle", "csrf_token": op_token}).status_code == 403
    admin.post("/charts/reference", data={"cls": "bottle", "action": "clear", "csrf_token": token})
    assert "(pinned)" not in admin.get(f"/charts/?site={site}&window=1h").get_data(as_text=True)


def test_pages_show_pruned_images_as_such(
    make_app: Callable[..., Flask], accounts, hub_db: Database, tmp_path, site: str, make_result
) -> None:
    from tests.hub.conftest import login

    app = make_app(HUB_DATA_DIR=str(tmp_path))  # a store of its own: this test deletes from it
    client = app.test_client()
    login(client, accounts("viewer"))
    r = make_result(site, "cam-p", crops=1)
    BatchWriter(hub_db, ImageStore(tmp_path / "images")).write([Envelope(site, "cam-p", r, datetime.now(UTC))])
    for path in (tmp_path / "images").rglob("*.png"):
        path.unlink()  # the heat map
    html = client.get(f"/results/{r.id}").get_data(as_text=True)
    assert "image pruned" in html
    assert hashlib.sha256(r.heatmap).hexdigest() not in html
    assert hashlib.sha256(r.thumbnail).hexdigest() in html


def test_fleet_and_device_pages_show_results_awaiting_the_hub_s_receipt(
    client: FlaskClient, hub_db: Database, store: ImageStore, site: str
) -> None:
    from shared import messages

    metrics = messages.Metrics(device="cam-r", ts=time.time(), fps=5.0, latency_p50_ms=1.0, latency_p95_ms=2.0,
                               frames_dropped=0, spool_depth=40, pending_receipts=25)
    BatchWriter(hub_db, store).write([Envelope(site, "cam-r", metrics, datetime.now(UTC))])
    html = client.get(f"/?site={site}").get_data(as_text=True)
    row = re.search(r'<tr class="device [a-z]+">(.*?cam-r.*?)</tr>', html, re.DOTALL).group(1)
    assert re.search(r'>40 <span class="muted pending-receipts">\(25\)</span>', row)
    page = client.get(f"/devices/{site}/cam-r").get_data(as_text=True)
    assert re.search(r'<span class="figure">25</span><span class="label">sent, awaiting the hub', page)
    assert re.search(r'<span class="figure">40</span><span class="label">results spooled, not yet confirmed', page)
    api = client.get(f"/api/devices?site={site}").get_json()
    assert [(d["spool_depth"], d["pending_receipts"]) for d in api["devices"]] == [(40, 25)]
