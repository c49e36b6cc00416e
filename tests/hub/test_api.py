"""The JSON API: its OpenAPI document matches the routes; reviews, training data, models."""

from __future__ import annotations

import re

from flask import Flask
from flask.testing import FlaskClient

from hub.db.session import Database
from hub.services import users


def test_openapi_documents_every_api_route_and_nothing_else(app: Flask, client: FlaskClient) -> None:
    doc = client.get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) for path, ops in doc["paths"].items()}
    assert documented == routes
    refs = set(re.findall(r'"#/components/(\w+)/(\w+)"', str(doc).replace("'", '"')))
    for kind, name in refs:
        assert name in doc["components"][kind], f"dangling $ref {kind}/{name}"
    for path, ops in doc["paths"].items():
        for op in ops.values():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), path


def test_results_device_and_paging_by_score(client: FlaskClient, seeded, site: str) -> None:
    body = client.get(f"/api/results?site={site}&sort=score&limit=2").get_json()
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted((r.score for r in seeded.values()), reverse=True)[:2]
    pages = [body["results"]]
    while body["next"]:
        body = client.get(body["next"]).get_json()
        pages.append(body["results"])
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [r for page in pages for r in page]
    assert [r["score"] for r in listed] == sorted((r.score for r in seeded.values()), reverse=True)
    assert {r["id"] for r in listed} == set(seeded)
    assert all(r["station"] in ("st-1", "st-2") and r["cls"] in ("bottle", "screw") for r in listed)

    device = client.get(f"/api/devices/{site}/cam-a").get_json()
    assert device["state"] == "online" and device["activity"]["results_last_day"] == 5
    assert device["activity"]["classes"] == ["bottle", "screw"]
    assert client.get(f"/api/devices/{site}/ghost").status_code == 404
    bad = client.get("/api/results?sort=score&before=01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert bad.status_code == 400 and "<score>~<result id>" in bad.get_json()["detail"]


def test_browser_sessions_post_to_the_api_with_the_csrf_header(sign_in, seeded) -> None:
    operator, token = sign_in("operator")
    rid = next(iter(seeded))
    refused = operator.post(f"/api/results/{rid}/reviews", json={"label": "defect"})
    assert refused.status_code == 400 and "CSRF" in refused.get_json()["detail"]
    created = operator.post(
        f"/api/results/{rid}/reviews",
        json={"label": "defect", "note": "crack at the rim"},
        headers={"X-CSRF-Token": token},
    )
    assert created.status_code == 201
    body = created.get_json()
    assert body["note"] == "crack at the rim" and body["latest"] and body["reviewer"].startswith("otto-")
    listed = operator.get(f"/api/results/{rid}/reviews").get_json()["reviews"]
    assert [r["id"] for r in listed] == [body["id"]]
    assert operator.get("/api/reviews?label=defect&limit=500").get_json()["reviews"][0]["id"] == body["id"]
    bad = operator.post(
        f"/api/results/{rid}/reviews", json={"label": "meh"}, headers={"X-CSRF-Token": token}
    )
    assert bad.status_code == 400 and "label must be one of" in bad.get_json()["detail"]


def test_models_are_registered_by_admins_and_listed(
    app: Flask, hub_db: Database, unique: str
) -> None:
    with hub_db.transaction() as session:
        _, admin = users.create_token(session, f"ci-{unique}", "admin")
        _, viewer = users.create_token(session, f"ro-{unique}", "viewer")
    client = app.test_client()
    model = {
        "name": f"bottle-stfpm-{unique}",
        "version": "1.5.0",
        "sha256": "ab" * 32,
        "size_bytes": 12_345_678,
        "url": "/models/bottle-stfpm-1.5.0.kdpkg",
        "method": "stfpm",
        "classes": ["bottle", "cap"],
        "precision": "int8",
    }
    auth = lambda t: {"Authorization": f"Bearer {t}"}  # noqa: E731
    assert client.post("/api/models", json=model, headers=auth(viewer)).status_code == 403
    created = client.post("/api/models", json=model, headers=auth(admin))
    assert created.status_code == 201
    body = created.get_json()
    assert body["classes"] == ["bottle", "cap"] and body["rollouts"] == [] and body["devices_running"] == 0
    again = client.post("/api/models", json=model, headers=auth(admin))
    assert again.status_code == 400 and "registered already" in again.get_json()["detail"]
    broken = client.post("/api/models", json=model | {"sha256": "xyz", "version": "2"}, headers=auth(admin))
    assert broken.status_code == 400 and "sha256" in broken.get_json()["detail"]
    listed = client.get(f"/api/models?name={model['name']}", headers=auth(viewer)).get_json()["models"]
    assert [m["version"] for m in listed] == ["1.5.0"]
    assert client.get(f"/api/models/{body['id']}", headers=auth(viewer)).get_json()["sha256"] == "ab" * 32
    assert client.get("/api/models/999999", headers=auth(viewer)).status_code == 404
