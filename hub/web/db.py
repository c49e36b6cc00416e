"""The request's database session and image store, tied to Flask's application context.

One session per request, opened on first use and closed when the request
ends, as in the Flask tutorial; the engine behind it lives as long as the app.
"""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from hub.db.session import Database
from hub.store import Images


def init_app(app: Flask, db: Database, store: Images) -> None:
    app.extensions["hub.db"] = db
    app.extensions["hub.store"] = store
    app.teardown_appcontext(close_session)
    app.jinja_env.globals["has_image"] = has_image


def get_db() -> Database:
    return current_app.extensions["hub.db"]


def get_session() -> Session:
    """This request's session; a view that writes through it commits it."""
    if "db_session" not in g:
        g.db_session = get_db().session()
    return g.db_session


def get_store() -> Images:
    return current_app.extensions["hub.store"]


def has_image(sha: str | None) -> bool:
    """True when the store holds `sha` (retention may have deleted an old result's images)."""
    return bool(sha) and sha in get_store()


def close_session(_exc: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
