"""Parameters no view may pass on: NUL characters anywhere, result ids that are not ULIDs."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.hub.test_auth import every_route

ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
FILTERS = ("site", "device", "station", "cls", "verdict", "review", "since", "until", "before", "window", "label")


def _gets(app: Flask) -> list[str]:
    return [url for endpoint, method, url in every_route(app) if method == "GET" and endpoint != "static"]


@pytest.mark.parametrize("name", FILTERS)
def test_a_nul_in_any_filter_of_any_page_is_400_naming_it(app: Flask, client: FlaskClient, seeded,
                                                          name: str) -> None:
    urls = _gets(app)
    assert {"/api/results", "/results/", "/gallery/", "/review/", "/live/", "/live/stream"} <= set(urls)
    for url in urls:
        response = client.get(url, query_string={name: "cam\x00-a"})
        assert response.status_code == 400, (url, response.status_code)
        text = response.get_data(as_text=True)
        assert f"query parameter &#39;{name}&#39; contains a NUL character" in text or (
            f"query parameter '{name}' contains a NUL character" in text), (url, text[:300])
        if url.startswith("/api/"):
            assert "Remove it" in response.get_json()["detail"]


def test_a_nul_in_the_address_a_form_or_a_json_body_is_400(app: Flask, client: FlaskClient,
                                                           sign_in, seeded, site: str) -> None:
    for url in (f"/devices/{site}/cam%00-a", f"/api/devices/{site}/cam%00-a", f"/results/{ULID[:-1]}%00",
                f"/api/results/{ULID[:-1]}%00"):
        response = client.get(url)
        assert response.status_code == 400, url
        assert "contains a NUL character" in response.get_data(as_text=True), url
    operator, token = sign_in("operator")
    rid = next(iter(seeded))
    form = operator.post(f"/review/{rid}", data={"label": "defect", "note": "bad\x00", "csrf_token": token})
    assert form.status_code == 400 and "form field &#39;note&#39;" in form.get_data(as_text=True)
    body = operator.post(f"/api/results/{rid}/reviews", data=json.dumps({"label": "defect", "note": "x\x00"}),
                         content_type="application/json", headers={"X-CSRF-Token": token})
    assert body.status_code == 400 and "JSON field 'note'" in body.get_json()["detail"]
    assert operator.get(f"/api/results/{rid}/reviews").get_json()["reviews"] == []   # nothing was stored
    # the sign-in form too: the user name would reach the database
    anonymous = app.test_client()
    page = anonymous.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    login = anonymous.post("/login", data={"username": "ada\x00", "password": "x", "csrf_token": csrf})
    assert login.status_code == 400 and "form field &#39;username&#39;" in login.get_data(as_text=True)


@pytest.mark.parametrize("bad", ["0" * 26 + "X" * 174, ULID.lower(), "8" + ULID[1:], ULID[:-1], "nope"])
def test_result_ids_that_are_not_ulids_are_refused(client: FlaskClient, sign_in, seeded, bad: str) -> None:
    page = client.get(f"/results/{bad}")
    assert page.status_code == 400 and "must be a result id (26-character ULID)" in page.get_data(as_text=True)
    for url in (f"/api/results/{bad}", f"/api/results/{bad}/reviews"):
        response = client.get(url)
        assert response.status_code == 400, url
        assert "must be a result id (26-character ULID)" in response.get_json()["detail"]
    operator, token = sign_in("operator")
    posted = operator.post(f"/api/results/{bad}/reviews", json={"label": "defect"}, headers={"X-CSRF-Token": token})
    assert posted.status_code == 400
    form = operator.post(f"/review/{bad}", data={"label": "defect", "csrf_token": token})
    assert form.status_code == 400


def test_a_well_formed_id_of_no_result_is_404(client: FlaskClient, seeded) -> None:
    assert ULID not in seeded
    assert client.get(f"/results/{ULID}").status_code == 404
    assert client.get(f"/api/results/{ULID}").status_code == 404
    assert client.get(f"/api/results/{next(iter(seeded))}").status_code == 200
