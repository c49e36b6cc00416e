"""Sign-in, sessions, roles, API tokens and CSRF protection.

Every request but the login page and static files needs a principal: a
signed-in user (session cookie) or a service (``Authorization: Bearer
<token>``, JSON API only). Pages send anonymous visitors to the login page;
the API answers 401. Every state-changing request from a browser carries the
session's CSRF token, as the form field ``csrf_token`` or the header
``X-CSRF-Token``; token-authenticated API calls carry no cookies and need none.
Sign-in is throttled per account and per address (hub/services/users.py).
The session cookie is marked ``Secure`` whenever the request came over HTTPS
(directly, or through a trusted reverse proxy's ``X-Forwarded-Proto``), and
always with ``SESSION_COOKIE_SECURE``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    g,
    has_request_context,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from flask.typing import ResponseReturnValue

from hub.services import users
from hub.services.users import Principal
from hub.web.db import get_session

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = frozenset({"auth.login", "static"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

F = TypeVar("F", bound=Callable[..., Any])


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, the cookie `Secure` whenever this request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)


def current() -> Principal | None:
    """Who is making this request (None on the login page before signing in)."""
    return g.get("principal")


def csrf_token() -> str:
    """This session's CSRF token, made on first use (templates put it in every form)."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _is_api() -> bool:
    return request.path.startswith("/api/")


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def load_principal() -> ResponseReturnValue | None:
    """before_request: identify the caller, check CSRF, refuse the anonymous."""
    db_session = get_session()
    token = _bearer()
    principal: Principal | None = None
    if token is not None and _is_api():
        principal = users.token_principal(db_session, token)
        db_session.commit()  # its last use, at most once a minute
        if principal is None:
            return _refuse_api("the API token is unknown or revoked; ask an admin for a new one")
    elif "uid" in session:
        principal = users.session_user(db_session, session["uid"], session.get("epoch", -1))
        if principal is None:
            session.clear()  # deactivated, or password or role changed since the login
    g.principal = principal

    if request.method in UNSAFE_METHODS and (principal is None or principal.kind != "token"):
        sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
        expected = session.get("csrf", "")
        if not expected or not hmac.compare_digest(sent, expected):
            abort(
                400,
                "This form is missing its security (CSRF) token, or the token has expired. "
                "Reload the page and submit it again.",
            )

    if principal is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if _is_api():
            return _refuse_api("sign in, or send an API token as 'Authorization: Bearer <token>'")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return None


def _refuse_api(detail: str) -> ResponseReturnValue:
    response = jsonify(error="Unauthorized", detail=detail, status=401)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="kdfleet hub"'
    return response


def requires(role: str) -> Callable[[F], F]:
    """Decorator: the caller's role must allow `role` (viewer < operator < admin), else 403."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            principal = current()
            if principal is None or not principal.allows(role):
                abort(403, f"This needs the {role} role; ask an admin if you should have it.")
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorate


def _safe_next(target: str | None) -> str:
    """Only local paths: a login link must not send people to another site."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//"):
            return target
    return url_for("fleet.index")


def _login_page(**context: Any) -> str:
    return render_template(
        "auth/login.html",
        account_failures=users.ACCOUNT_FAILURES,
        address_failures=users.ADDRESS_FAILURES,
        window_minutes=int(users.THROTTLE_WINDOW.total_seconds() // 60),
        **context,
    )


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        if current() is not None:
            return redirect(_safe_next(request.args.get("next")))
        return _login_page(next=request.args.get("next", ""))
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    db_session = get_session()
    try:
        principal = users.sign_in(db_session, username, password, request.remote_addr or "")
    except users.Throttled as exc:
        db_session.rollback()
        current_app.logger.warning(
            "sign-in for %r from %s refused unchecked: %s", username[:64], request.remote_addr, exc
        )
        body = _login_page(next=request.form.get("next", ""), username=username, error=str(exc))
        return body, 429, {"Retry-After": str(exc.retry_after_s)}
    db_session.commit()
    if principal is None:
        current_app.logger.warning("failed sign-in for %r from %s", username[:64], request.remote_addr)
        body = _login_page(
            next=request.form.get("next", ""),
            username=username,
            error="Wrong user name or password, or the account is deactivated.",
        )
        return body, 401
    session.clear()  # a fresh session (and CSRF token) for the signed-in user
    session.permanent = True
    session["uid"], session["epoch"] = principal.id, principal.epoch
    csrf_token()
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account", methods=["GET", "POST"])
def account() -> ResponseReturnValue:
    principal = current()
    assert principal is not None
    if principal.kind != "user":
        abort(403, "API tokens have no account page")
    if request.method == "POST":
        new = request.form.get("new_password", "")
        if new != request.form.get("repeat_password", ""):
            flash("The new passwords differ; nothing was changed.", "error")
        else:
            db_session = get_session()
            try:
                users.set_password(
                    db_session, principal.id, new, current_password=request.form.get("password", "")
                )
            except users.UserError as exc:
                db_session.rollback()
                flash(str(exc), "error")
            else:
                db_session.commit()
                session["epoch"] = principal.epoch + 1  # this session stays; the others end
                flash("Password changed. Other sessions of yours are signed out.", "ok")
                return redirect(url_for("auth.account"))
    return render_template("auth/account.html")
