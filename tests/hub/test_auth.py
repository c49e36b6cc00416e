"""Who may do what: sign-in, roles, sessions, API tokens and CSRF protection."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from tests.hub.conftest import PASSWORD, csrf_of, login
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


# -- sign-in throttle -------------------------------------------------------------------


def _attempt(client, username: str, password: str, address: str):
    token = csrf_of(client.get("/login", environ_base={"REMOTE_ADDR": address}).get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                       environ_base={"REMOTE_ADDR": address})


def test_wrong_passwords_pause_an_account_s_sign_in_and_the_page_says_so(
    app: Flask, accounts: Callable[[str], str], unique: str, hub_db: Database
) -> None:
    victim, other = accounts("viewer"), accounts("operator")
    client = app.test_client()
    page = " ".join(client.get("/login").get_data(as_text=True).split())
    assert (f"After {users.ACCOUNT_FAILURES} wrong passwords for one account within 15 minutes, or "
            f"{users.ADDRESS_FAILURES} from one address, signing in there pauses for up to 15 minutes") in page
    guesser = f"10.1.{int(unique[:2], 16)}.{int(unique[2:4], 16)}"
    for i in range(users.ACCOUNT_FAILURES):
        assert _attempt(client, victim, f"guess {i}", guesser).status_code == 401
    # the right password no longer helps, from that address or any other: it is not even checked
    for address in (guesser, "10.2.0.1"):
        paused = _attempt(client, victim, PASSWORD, address)
        assert paused.status_code == 429, address
        assert "Too many wrong passwords for this account: signing in is paused for 15 more minutes" in \
            paused.get_data(as_text=True)
        assert 890 <= int(paused.headers["Retry-After"]) <= 900
    assert _attempt(client, other, PASSWORD, guesser).status_code == 302   # another account is not paused
    with hub_db.transaction() as session:   # an admin sets a new password: the pause ends
        user_id = next(u.id for u in users.list_users(session) if u.username == victim)
        users.set_password(session, user_id, "a brand new password")
    assert _attempt(app.test_client(), victim, "a brand new password", guesser).status_code == 302


def test_wrong_passwords_from_one_address_pause_every_sign_in_from_it(
    app: Flask, accounts: Callable[[str], str], unique: str
) -> None:
    client = app.test_client()
    address = f"10.3.{int(unique[:2], 16)}.{int(unique[2:4], 16)}"
    for i in range(users.ADDRESS_FAILURES):   # a spray: one guess per name, no account reaches its own limit
        assert _attempt(client, f"spray-{unique}-{i}", "password1", address).status_code == 401
    paused = _attempt(client, accounts("viewer"), PASSWORD, address)
    assert paused.status_code == 429
    assert "Too many wrong passwords from this address" in paused.get_data(as_text=True)
    assert _attempt(app.test_client(), accounts("viewer"), PASSWORD, "10.4.0.1").status_code == 302


WORKER = """
import sys
from flask import Flask
from hub.services import users
from hub.web import create_app
users.PASSWORD_METHOD = "pbkdf2:sha256:1000"
db_url, data_dir, username, address, n = sys.argv[1:6]
app = create_app({"TESTING": True, "HUB_DB_URL": db_url, "HUB_DATA_DIR": data_dir})
client = app.test_client()
codes = []
for i in range(int(n)):
    page = client.get("/login").get_data(as_text=True)
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    codes.append(client.post("/login", data={"username": username, "password": f"worker {i}", "csrf_token": token},
                             environ_base={"REMOTE_ADDR": address}).status_code)
print(" ".join(map(str, codes)))
"""


def test_the_throttle_holds_across_the_hub_s_processes(
    app: Flask, accounts: Callable[[str], str], db_url: str, data_dir, unique: str
) -> None:
    import subprocess
    import sys
    from pathlib import Path

    victim = accounts("admin")
    address = f"10.5.{int(unique[:2], 16)}.{int(unique[2:4], 16)}"
    here = app.test_client()
    for i in range(users.ACCOUNT_FAILURES - 2):
        assert _attempt(here, victim, f"here {i}", address).status_code == 401
    # another web process on the same database (as `kdfleet hub serve` workers would be) sees them
    run = subprocess.run([sys.executable, "-c", WORKER, db_url, str(data_dir), victim, address, "3"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["401", "401", "429"]
    assert _attempt(here, victim, PASSWORD, address).status_code == 429


def test_failures_age_out_of_the_throttle(hub_db: Database, accounts: Callable[[str], str], unique: str) -> None:
    from datetime import timedelta

    from hub.db.models import LoginFailure
    from hub.services.common import now_utc

    victim = accounts("viewer")
    start = now_utc()
    with hub_db.transaction() as session:
        for i in range(users.ACCOUNT_FAILURES):
            assert users.sign_in(session, victim, "nope", "10.6.0.1", now=start + timedelta(seconds=i)) is None
    with hub_db.transaction() as session, pytest.raises(users.Throttled) as paused:
        users.sign_in(session, victim, PASSWORD, "10.6.0.1", now=start + timedelta(minutes=14, seconds=50))
    assert paused.value.retry_after_s == 10   # until the oldest of the five is 15 minutes old
    later = start + users.THROTTLE_WINDOW + timedelta(seconds=1)
    with hub_db.transaction() as session:
        assert users.sign_in(session, victim, PASSWORD, "10.6.0.1", now=later) is not None
        left = session.scalars(select(LoginFailure.username).where(LoginFailure.username == victim)).all()
    assert left == []   # a success clears the account's failures


# -- session cookies over HTTPS ---------------------------------------------------------------


def _session_cookie(response) -> str:
    found = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("kdfleet_session=")]
    assert found, "no session cookie set"
    return found[-1]


def test_the_session_cookie_is_secure_over_https_only(app: Flask, accounts: Callable[[str], str]) -> None:
    plain = app.test_client()
    assert "Secure" not in _session_cookie(plain.get("/login"))
    https = app.test_client()
    page = https.get("/login", base_url="https://hub.example")
    assert "; Secure" in _session_cookie(page) and "HttpOnly" in _session_cookie(page)
    signed_in = https.post("/login", base_url="https://hub.example", data={
        "username": accounts("viewer"), "password": PASSWORD, "csrf_token": csrf_of(page.get_data(as_text=True))})
    assert signed_in.status_code == 302 and "; Secure" in _session_cookie(signed_in)


def test_behind_a_trusted_proxy_its_scheme_and_client_address_count(
    make_app: Callable[..., Flask], accounts: Callable[[str], str], unique: str
) -> None:
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": f"10.7.{int(unique[:2], 16)}.1"}
    untrusted = make_app().test_client()   # by default the headers are anyone's to forge: ignored
    assert "Secure" not in _session_cookie(untrusted.get("/login", headers=forwarded))
    proxied = make_app(HUB_PROXY_HOPS=1).test_client()
    page = proxied.get("/login", headers=forwarded)
    assert "; Secure" in _session_cookie(page)
    token = csrf_of(page.get_data(as_text=True))
    for i in range(users.ADDRESS_FAILURES):
        proxied.post("/login", headers=forwarded,
                     data={"username": f"spray-{unique}-{i}", "password": "password1", "csrf_token": token})
    paused = proxied.post("/login", headers=forwarded,
                          data={"username": accounts("viewer"), "password": PASSWORD, "csrf_token": token})
    assert paused.status_code == 429   # that client is paused ...
    elsewhere = {**forwarded, "X-Forwarded-For": "10.8.0.1"}   # ... not everyone behind the same proxy
    other = make_app(HUB_PROXY_HOPS=1).test_client()
    token = csrf_of(other.get("/login", headers=elsewhere).get_data(as_text=True))
    assert other.post("/login", headers=elsewhere, data={
        "username": accounts("viewer"), "password": PASSWORD, "csrf_token": token}).status_code == 302


def _self_signed(folder) -> tuple[str, str]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "hub.crt", folder / "hub.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_a_hub_served_over_tls_sets_a_secure_session_cookie(app: Flask, tmp_path) -> None:
    import ssl
    import threading
    import urllib.request

    from werkzeug.serving import make_server

    cert, key = _self_signed(tmp_path)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=(cert, key))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        context = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(f"https://127.0.0.1:{server.server_port}/login", context=context) as response:
            cookie = [h for h in response.headers.get_all("Set-Cookie") if h.startswith("kdfleet_session=")][-1]
    finally:
        server.shutdown()
        thread.join(5)
    assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_proxy_hops_is_a_checked_hub_setting(tmp_path) -> None:
    from hub.config import load as load_hub_config
    from shared.config import ConfigError

    good = tmp_path / "hub.toml"
    good.write_text("[web]\nproxy_hops = 1\nsecure_cookies = true\n")
    settings = load_hub_config(good).web_settings()
    assert (settings["HUB_PROXY_HOPS"], settings["SESSION_COOKIE_SECURE"]) == (1, True)
    bad = tmp_path / "bad.toml"
    bad.write_text("[web]\nproxy_hops = 9\n")
    with pytest.raises(ConfigError, match=r"web\.proxy_hops: 9 is not within 0\.\.5"):
        load_hub_config(bad)
