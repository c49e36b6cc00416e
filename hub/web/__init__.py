"""The hub's dashboard and JSON API: a Flask app factory with one blueprint per feature.

Settings (keys of `test_config`, or of the mapping the CLI passes):
``HUB_DB_URL`` database URL; ``HUB_DATA_DIR`` where images and the secret
key live; ``SECRET_KEY`` (else read from, or created in,
``<HUB_DATA_DIR>/secret_key``); ``HUB_SILENT_AFTER_S`` seconds without news
after which an online device shows as silent; ``HUB_REFRESH_S`` how often the
fleet page reloads itself (0: never); ``HUB_LIVE_POLL_S`` how often the live
feed looks for new results; ``HUB_LIVE_MAX_S`` how long one live stream lasts
before the browser reconnects; ``HUB_PROXY_HOPS`` how many reverse proxies in
front of the hub to trust for the client's address and scheme
(``X-Forwarded-For``, ``X-Forwarded-Proto``; 0: none, the headers are
ignored); ``HUB_TRUSTED_KEYS`` public key files one of which must have signed
every uploaded package (none: every upload is refused unless
``HUB_ALLOW_UNSIGNED``); plus Flask's own session settings (the session cookie
is ``Secure`` over HTTPS whatever ``SESSION_COOKIE_SECURE`` says).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from hub.db.session import Database, check_schema
from hub.store import ImageStore
from hub.web import (
    admin,
    api,
    auth,
    charts,
    db,
    fleet,
    gallery,
    images,
    live,
    metrics,
    params,
    registry,
    results,
    review,
)
from hub.web.format import register_filters

DEFAULTS: dict[str, Any] = {
    "HUB_DB_URL": "sqlite:///var/hub/hub.db",
    "HUB_DATA_DIR": "var/hub",
    "HUB_SILENT_AFTER_S": 120,
    "HUB_REFRESH_S": 10,
    "HUB_LIVE_POLL_S": 1.0,
    "HUB_LIVE_MAX_S": 300,
    "HUB_PROXY_HOPS": 0,
    "PERMANENT_SESSION_LIFETIME": 12 * 3600,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_NAME": "kdfleet_session",
}

# nothing may load from elsewhere: the dashboard runs on factory networks without internet
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
BLUEPRINTS = (
    auth.bp,
    fleet.bp,
    live.bp,
    results.bp,
    gallery.bp,
    review.bp,
    charts.bp,
    registry.bp,
    admin.bp,
    images.bp,
    api.bp,
    metrics.bp,  # authenticates /metrics itself, before auth.load_principal (see hub/web/metrics.py)
)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the hub's Flask app; `test_config` overrides the defaults (tests, the CLI)."""
    app = Flask(
        "hub",
        root_path=str(Path(__file__).resolve().parent.parent),  # hub/: templates/ and static/
        template_folder="templates",
        static_folder="static",
    )
    app.config.from_mapping(DEFAULTS)
    if test_config is not None:
        app.config.from_mapping(test_config)
    if isinstance(app.config["PERMANENT_SESSION_LIFETIME"], int | float):
        app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(
            seconds=app.config["PERMANENT_SESSION_LIFETIME"]
        )
    data_dir = Path(app.config["HUB_DATA_DIR"])
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = load_or_create_secret(data_dir / "secret_key")

    app.session_interface = auth.SessionInterface()
    hops = int(app.config["HUB_PROXY_HOPS"])
    if hops:  # the proxy's view of the client: the address the sign-in throttle counts, http or https
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]

    database = Database(app.config["HUB_DB_URL"])
    check_schema(database)
    # HUB_IMAGE_STORE: the store `serve` opened from the [images] settings; else the folder in the data dir
    db.init_app(app, database, app.config.get("HUB_IMAGE_STORE") or ImageStore(data_dir / "images"))
    register_filters(app)
    app.jinja_env.globals.update(csrf_token=auth.csrf_token, principal=auth.current)
    # first of all hooks, /metrics's and sign-in's included: a user name with NUL would reach the database
    app.before_request(params.refuse_nul)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)

    app.before_request(auth.load_principal)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    return app


def load_or_create_secret(path: Path) -> str:
    """The per-instance secret in `path`, created (mode 0600) on first use.

    The new file is written aside and hard-linked into place, so processes
    starting together agree on one key and none reads a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first; use theirs
        finally:
            os.unlink(tmp)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise RuntimeError(
            f"{path} holds a secret key shorter than 32 characters; "
            "delete the file to have a new one made"
        )
    return secret


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "static" and request.endpoint != "images.get":
        response.headers.setdefault("Cache-Control", "no-store")  # pages name people and defects
    return response


def _http_error(exc: HTTPException) -> tuple[Any, int]:
    code = exc.code or 500
    if request.path.startswith("/api/"):
        return jsonify(error=exc.name, detail=exc.description, status=code), code
    return render_template("error.html", error=exc), code
