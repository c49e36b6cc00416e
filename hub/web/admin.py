"""Administration: dashboard users (roles, deactivation, password resets) and API tokens."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.db.models import ROLES
from hub.services import users
from hub.services.common import NotFound
from hub.web.auth import current, requires
from hub.web.db import get_session

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.before_request
@requires("admin")
def _admins_only() -> None:
    """Every page here is for admins."""


@bp.get("/users")
def user_list() -> ResponseReturnValue:
    return render_template("admin/users.html", users=users.list_users(get_session()), roles=ROLES)


@bp.post("/users")
def user_create() -> ResponseReturnValue:
    session = get_session()
    username = request.form.get("username", "").strip()
    try:
        users.create_user(
            session, username, request.form.get("password", ""), request.form.get("role", "viewer")
        )
    except users.UserError as exc:
        session.rollback()
        flash(str(exc), "error")
    else:
        session.commit()
        flash(f"Added {request.form.get('role')} {username!r}.", "ok")
    return redirect(url_for("admin.user_list"))


@bp.post("/users/<int:user_id>")
def user_update(user_id: int) -> ResponseReturnValue:
    session = get_session()
    action = request.form.get("action", "")
    principal = current()
    try:
        if action == "role":
            users.update_user(session, user_id, role=request.form.get("role", ""))
        elif action in ("deactivate", "activate"):
            if principal is not None and principal.id == user_id and action == "deactivate":
                raise users.UserError("you cannot deactivate yourself; ask another admin")
            users.update_user(session, user_id, active=action == "activate")
        elif action == "password":
            users.set_password(session, user_id, request.form.get("password", ""))
        else:
            abort(400, f"unknown action {action!r}: use role, activate, deactivate or password")
    except NotFound as exc:
        abort(404, str(exc))
    except users.UserError as exc:
        session.rollback()
        flash(str(exc), "error")
    else:
        session.commit()
        flash("Saved. The user's open sessions have ended.", "ok")
    return redirect(url_for("admin.user_list"))


@bp.get("/tokens")
def token_list() -> ResponseReturnValue:
    return render_template("admin/tokens.html", tokens=users.list_tokens(get_session()), roles=ROLES)


@bp.post("/tokens")
def token_create() -> ResponseReturnValue:
    session = get_session()
    try:
        view, token = users.create_token(
            session, request.form.get("name", "").strip(), request.form.get("role", "viewer")
        )
    except users.UserError as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.token_list"))
    session.commit()
    # shown once, on this page only: the hub keeps only its hash
    body = render_template(
        "admin/tokens.html", tokens=users.list_tokens(session), roles=ROLES, new=(view, token)
    )
    return body, 201


@bp.post("/tokens/<int:token_id>/revoke")
def token_revoke(token_id: int) -> ResponseReturnValue:
    session = get_session()
    try:
        view = users.revoke_token(session, token_id=token_id)
    except NotFound as exc:
        abort(404, str(exc))
    session.commit()
    flash(f"Token {view.name!r} revoked.", "ok")
    return redirect(url_for("admin.token_list"))
