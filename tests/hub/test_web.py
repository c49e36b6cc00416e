"""The dashboard pages and the JSON API over stored results (seeded through the ingest writer)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from shared.imaging import decode_image


def image_urls(html: str) -> list[str]:
    return re.findall(r'<img[^>]* src="(/images/[0-9a-f]{64})"', html)


def test_fleet_page_shows_devices_online_state_and_model(
    client: FlaskClient, seeded, site: str
) -> None:
    response = client.get(f"/?site={site}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    row_a = re.search(r'<tr class="device online">(.*?)</tr>', html, re.DOTALL)
    row_b = re.search(r'<tr class="device offline">(.*?)</tr>', html, re.DOTALL)
    assert (
        row_a
        and "cam-a" in row_a.group(1)
        and "1.4.0" in row_a.group(1)
        and "tensorrt" in row_a.group(1)
    )
    assert "12.2" in row_a.group(1) and "41.5 ms" in row_a.group(1) and "just now" in row_a.group(1)
    assert row_b and "cam-b" in row_b.group(1) and "never" in row_b.group(1)


def test_results_page_shows_stored_results_with_images_that_decode(
    client: FlaskClient, seeded, site: str
) -> None:
    response = client.get(f"/results/?site={site}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for rid in seeded:
        assert f"/results/{rid}" in html
    assert html.index(max(seeded)) < html.index(min(seeded)), "newest first"
    urls = image_urls(html)
    assert len(urls) == 5 * 2 + 2 * 2  # thumbnail and heat map each, plus the anomalies' crops
    for url in set(urls):
        image = client.get(url)
        assert image.status_code == 200
        assert image.mimetype in ("image/png", "image/jpeg")
        assert decode_image(image.data).ndim == 3
        assert "immutable" in image.headers["Cache-Control"]
        again = client.get(url, headers={"If-None-Match": image.headers["ETag"]})
        assert again.status_code == 304


def test_results_filter_by_verdict_and_page_through(client: FlaskClient, seeded, site: str) -> None:
    html = client.get(f"/results/?site={site}&verdict=anomaly").get_data(as_text=True)
    anomalies = {rid for rid, r in seeded.items() if r.verdict == "anomaly"}
    assert {rid for rid in seeded if f"/results/{rid}" in html} == anomalies

    first = client.get(f"/results/?site={site}&limit=3").get_data(as_text=True)
    older = re.search(r'href="([^"]*before=[^"]*)">Older', first)
    assert older, "a full page links to the older results"
    second = client.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    shown = [{rid for rid in seeded if f'/results/{rid}"' in page} for page in (first, second)]
    assert len(shown[0]) == 3 and len(shown[1]) == 2 and not shown[0] & shown[1]

    bad = client.get("/results/?verdict=maybe")
    assert bad.status_code == 400 and "verdict must be one of" in bad.get_data(as_text=True)


def test_result_detail_shows_heat_map_and_crops(client: FlaskClient, seeded) -> None:
    rid, r = next((rid, r) for rid, r in seeded.items() if r.crops)
    html = client.get(f"/results/{rid}").get_data(as_text=True)
    assert rid in html and "anomaly" in html and "Crops (2)" in html
    # the heat map over the frame, then frame and heat map apart, then the crops
    assert len(image_urls(html)) == 2 + 2 + len(r.crops)
    missing = client.get("/results/01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.status_code == 404 and "no result with id" in missing.get_data(as_text=True)


def test_unknown_or_malformed_image_names_are_404(client: FlaskClient) -> None:
    assert client.get("/images/" + "0" * 64).status_code == 404
    assert client.get("/images/../secret_key").status_code == 404
    assert client.get("/images/not-a-sha").status_code == 404


def test_api_lists_devices_and_results_as_json(client: FlaskClient, seeded, site: str) -> None:
    devices = client.get(f"/api/devices?site={site}").get_json()["devices"]
    assert [(d["name"], d["state"], d["online"]) for d in devices] == [
        ("cam-a", "online", True),
        ("cam-b", "offline", False),
    ]
    assert devices[0]["last_seen"].endswith("Z")

    body = client.get(f"/api/results?site={site}&limit=2").get_json()
    assert [r["id"] for r in body["results"]] == sorted(seeded, reverse=True)[:2]
    assert body["next"] and "before=" in body["next"]
    first = body["results"][0]
    assert first["site"] == site and first["verdict"] == seeded[first["id"]].verdict
    assert client.get(first["heatmap_url"]).data == seeded[first["id"]].heatmap

    rid = next(rid for rid, r in seeded.items() if r.crops)
    detail = client.get(f"/api/results/{rid}").get_json()
    assert [c["idx"] for c in detail["crops"]] == [0, 1] and detail["crops"][0][
        "image_url"
    ].startswith("/images/")

    error = client.get("/api/results?limit=0")
    assert error.status_code == 400 and "limit" in error.get_json()["detail"]
    assert client.get("/api/results/nope").status_code == 400   # not a ULID, so no result id
    assert client.get("/api/health").get_json() == {"status": "ok"}


def test_pages_load_nothing_from_elsewhere(client: FlaskClient, seeded, site: str) -> None:
    for url in (
        "/",
        f"/devices/{site}/cam-a",
        f"/results/?site={site}",
        f"/results/{next(iter(seeded))}",
        "/live/",
        "/gallery/",
        "/review/",
        "/review/history",
        "/charts/",
        "/models/",
        "/admin/users",
        "/admin/tokens",
        "/account",
        "/static/style.css",
        "/static/live.js",
        "/static/overlay.js",
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        text = response.get_data(as_text=True)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), (
            f"{url} refers to another host"
        )
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), f"{url} has an inline script"
        assert not re.search(r"\sstyle=", text), f"{url} has an inline style"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_secret_key_is_generated_once_per_instance(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    first, second = make_app(HUB_DATA_DIR=str(tmp_path)), make_app(HUB_DATA_DIR=str(tmp_path))
    other = make_app(HUB_DATA_DIR=str(tmp_path / "other"))
    key = first.config["SECRET_KEY"]
    assert len(key) >= 32 and key == second.config["SECRET_KEY"] != other.config["SECRET_KEY"]
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    given = make_app(HUB_DATA_DIR=str(tmp_path / "x"), SECRET_KEY="k" * 40)
    assert given.config["SECRET_KEY"] == "k" * 40 and not (tmp_path / "x" / "secret_key").exists()
