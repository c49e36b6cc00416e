"""Who may do what: sign-in, roles, sessions, API tokens and CSRF protection."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from tests.hub.conftest import csrf_of, login
from flask import Flask
from sqlalchemy import select

from hub.db.models import ApiToken
from hub.db.session import Database, upgrade
from hub.services import users

EXAMPLE_VALUES = {
    "site": "plant",
    "name": "cam-1",
    "result_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
    "sha": "0" * 64,
    "filename": "style.css",
    "user_id": 1,
    "token_id": 1,
    "model_id": 1,
    "rollout_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
    "action": "pause",
}


def every_route(app: Flask) -> list[tuple[str, str, str]]:
    """(endpoint, method, url) for every rule and method of the app."""
    out = []
    for rule in app.url_map.iter_rules():
        url = rule.rule
        for arg in rule.arguments:
            url = re.sub(rf"<(?:[a-z]+:)?{arg}>", str(EXAMPLE_VALUES[arg]), url)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, url))
    return out


def test_every_route_but_login_and_static_refuses_anonymous_users(app: Flask, seeded) -> None:
    routes = every_route(app)
    assert len(routes) > 30, "the app should have all its blueprints"
    client = app.test_client()
    token = csrf_of(client.get("/login").get_data(as_text=True))  # so POSTs pass CSRF and hit auth
    checked = 0
    for endpoint, method, url in routes:
        if endpoint in ("auth.login", "static"):
            continue
        response = client.open(url, method=method, data={"csrf_token": token})
        if url.startswith("/api/") or url == "/metrics":   # machines' endpoints answer 401, not a login page
            assert response.status_code == 401, (method, url, response.status_code)
            assert "Bearer" in response.headers["WWW-Authenticate"]
            if url != "/metrics":
                assert response.get_json()["detail"]
        else:
            assert response.status_code == 302, (method, url, response.status_code)
            assert response.headers["Location"].startswith("/login?next="), (method, url)
        checked += 1
    assert checked == sum(e not in ('auth.login', 'static') for e, _, _ in routes)
    assert client.get("/login").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_login_then_logout(app: Flask, accounts: Callable[[str], str], seeded) -> None:
    client = app.test_client()
    anonymous = client.get("/results/?verdict=anomaly")
    assert anonymous.status_code == 302
    assert anonymous.headers["Location"] == "/login?next=/results/?verdict%3Danomaly"

    page = client.get(anonymous.headers["Location"]).get_data(as_text=True)
    token = csrf_of(page)
    wrong = client.post(
        "/login",
        data={"username": accounts("viewer"), "password": "not it", "csrf_token": token},
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.get_data(as_text=True)
    nobody = client.post(
        "/login", data={"username": "nobody", "password": "x" * 10, "csrf_token": token}
    )
    assert nobody.status_code == 401

    signed_in = client.post(
        "/login",
        data={
            "username": accounts("viewer"),
            "password": "correct horse battery",
            "csrf_token": token,
            "next": "/results/?verdict=anomaly",
        },
    )
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == "/results/?verdict=anomaly"
    page = client.get("/").get_data(as_text=True)
    assert accounts("viewer") in page and "Sign out" in page
    assert "Admin" not in page  # viewers see no admin link

    token = csrf_of(page)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_login_does_not_redirect_to_other_sites(app: Flask, accounts: Callable[[str], str]) -> None:
    client = app.test_client()
    token = csrf_of(client.get("/login").get_data(as_text=True))
    for target in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)"):
        response = client.post(
            "/login",
            data={
                "username": accounts("viewer"),
                "password": "correct horse battery",
                "csrf_token": token,
                "next": target,
            },
        )
        assert response.headers["Location"] == "/", target
        token = csrf_of(client.get("/account").get_data(as_text=True))


@pytest.mark.parametrize(
    ("url", "data"),
    [
        ("/login", {"username": "x", "password": "y" * 10}),
        ("/logout", {}),
        ("/review/01ARZ3NDEKTSV4RRFFQ69G5FAV", {"label": "defect"}),
        ("/admin/users", {"username": "MALLORY", "password": "p" * 12, "role": "admin"}),
        ("/admin/tokens", {"name": "MALLORY", "role": "admin"}),
        ("/charts/reference", {"cls": "bottle"}),
        ("/account", {"password": "x", "new_password": "y" * 10, "repeat_password": "y" * 10}),
    ],
)
def test_a_form_without_its_csrf_token_is_refused(
    sign_in, hub_db: Database, unique: str, url: str, data: dict[str, str]
) -> None:
    mallory = f"mallory-{unique}"
    data = {k: v.replace("MALLORY", mallory) for k, v in data.items()}
    client, token = sign_in("admin")
    for sent in (data, data | {"csrf_token": "forged"}):
        response = client.post(url, data=sent)
        assert response.status_code == 400, (url, response.status_code)
        assert "CSRF" in response.get_data(as_text=True)
    with hub_db.session() as session:
        assert mallory not in {u.username for u in users.list_users(session)}
        assert mallory not in {t.name for t in users.list_tokens(session)}
    # the same request with the token goes through (a redirect, not a refusal)
    if url == "/admin/users":
        assert client.post(url, data=data | {"csrf_token": token}).status_code == 302


def test_roles_allow_what_they_should(sign_in, seeded) -> None:
    rid = next(rid for rid, r in seeded.items() if r.verdict == "anomaly")
    viewer, viewer_token = sign_in("viewer")
    operator, operator_token = sign_in("operator")
    admin, _ = sign_in("admin")

    for client in (viewer, operator, admin):
        for url in ("/", "/results/", "/gallery/", "/review/", "/charts/", "/live/", "/models/"):
            assert client.get(url).status_code == 200, url

    refused = viewer.post(f"/review/{rid}", data={"label": "defect", "csrf_token": viewer_token})
    assert refused.status_code == 403 and "operator role" in refused.get_data(as_text=True)
    assert "Defect confirmed" not in viewer.get(f"/results/{rid}").get_data(as_text=True)

    done = operator.post(f"/review/{rid}", data={"label": "defect", "csrf_token": operator_token})
    assert done.status_code == 302
    assert operator.get("/admin/users").status_code == 403
    assert viewer.get("/admin/tokens").status_code == 403
    assert admin.get("/admin/users").status_code == 200


def test_sessions_end_when_an_admin_deactivates_the_user(
    sign_in, accounts: Callable[[str], str], hub_db: Database
) -> None:
    operator, _ = sign_in("operator")
    admin, admin_token = sign_in("admin")
    assert operator.get("/").status_code == 200
    with hub_db.session() as session:
        uid = next(u.id for u in users.list_users(session) if u.username == accounts("operator"))
    response = admin.post(
        f"/admin/users/{uid}", data={"action": "deactivate", "csrf_token": admin_token}
    )
    assert response.status_code == 302
    assert operator.get("/").status_code == 302  # signed out
    again = operator.application.test_client()
    token = csrf_of(again.get("/login").get_data(as_text=True))
    refused = again.post(
        "/login",
        data={"username": accounts("operator"), "password": "correct horse battery", "csrf_token": token},
    )
    assert refused.status_code == 401


def test_the_last_admin_cannot_lock_everyone_out(fresh_db_url: str) -> None:
    db = Database(fresh_db_url)
    try:
        upgrade(db)
        with db.transaction() as session:
            admin = users.create_user(session, "root", "p" * 12, "admin").id
            viewer = users.create_user(session, "eve", "p" * 12, "viewer").id
        for change in ({"role": "viewer"}, {"active": False}):
            with db.transaction() as session, pytest.raises(users.UserError, match="last active admin"):
                users.update_user(session, admin, **change)
        with db.transaction() as session:
            users.update_user(session, viewer, role="admin")
        with db.transaction() as session:
            users.update_user(session, admin, active=False)  # another admin exists now
    finally:
        db.dispose()


def test_api_tokens_authenticate_services_and_are_stored_hashed(
    app: Flask, hub_db: Database, unique: str, seeded
) -> None:
    with hub_db.transaction() as session:
        _, reader = users.create_token(session, f"dash-{unique}", "viewer")
        _, trainer = users.create_token(session, f"trainer-{unique}", "operator")
    with hub_db.session() as session:
        stored = {t.token_hash for t in session.scalars(select(ApiToken))}
    assert reader not in stored and trainer not in stored  # only hashes
    client = app.test_client()

    def api(method: str, url: str, token: str | None, **kw) -> object:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return client.open(url, method=method, headers=headers, **kw)

    assert api("GET", "/api/results", reader).status_code == 200
    assert api("GET", "/api/results", "kdf_not-a-token").status_code == 401
    assert api("GET", "/api/results", None).status_code == 401
    rid = next(rid for rid, r in seeded.items() if r.verdict == "anomaly")
    # token requests need no CSRF token, but the role must allow the write
    refused = api("POST", f"/api/results/{rid}/reviews", reader, json={"label": "false_alarm"})
    assert refused.status_code == 403
    created = api("POST", f"/api/results/{rid}/reviews", trainer, json={"label": "false_alarm"})
    assert created.status_code == 201 and created.get_json()["label"] == "false_alarm"
    # a token does not open the dashboard pages
    assert api("GET", "/", reader).status_code == 302

    with hub_db.transaction() as session:
        users.revoke_token(session, name=f"dash-{unique}")
    assert api("GET", "/api/results", reader).status_code == 401
    with hub_db.session() as session:
        used = {t.name: t.last_used_at for t in users.list_tokens(session)}
    assert used[f"dash-{unique}"] is not None


def test_changing_your_password_ends_your_other_sessions(sign_in, app: Flask, accounts) -> None:
    first, token = sign_in("viewer")
    second = app.test_client()
    login(second, accounts("viewer"))
    response = first.post(
        "/account",
        data={
            "password": "correct horse battery",
            "new_password": "a new long password",
            "repeat_password": "a new long password",
            "csrf_token": token,
        },
    )
    assert response.status_code == 302
    assert first.get("/").status_code == 200  # this session stays
    assert second.get("/").status_code == 302  # the other one ends
    login(app.test_client(), accounts("viewer"), "a new long password")
