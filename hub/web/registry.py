"""Models: the registry of model packages, which devices run them, and their rollouts."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.services import registry, retraining, rollouts
from hub.services.common import NotFound, QueryError
from hub.web.auth import requires
from hub.web.db import get_session
from hub.web.fleet import silent_after

bp = Blueprint("registry", __name__, url_prefix="/models")
ACTIONS = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}


@bp.get("/")
def index() -> ResponseReturnValue:
    session = get_session()
    return render_template("registry/index.html", models=registry.list_models(session),
                           cycles=retraining.recent_cycles(session))


@bp.get("/rollouts/<rollout_id>")
def rollout(rollout_id: str) -> ResponseReturnValue:
    try:
        detail = rollouts.rollout_detail(get_session(), rollout_id, silent_after=silent_after())
    except NotFound as exc:
        abort(404, str(exc))
    return render_template("registry/rollout.html", r=detail)


@bp.post("/rollouts/<rollout_id>/<action>")
@requires("admin")
def act(rollout_id: str, action: str) -> ResponseReturnValue:
    if action not in ACTIONS:
        abort(404, f"no rollout action {action!r}; use pause, resume or abort")
    session = get_session()
    try:
        ACTIONS[action](session, rollout_id, request.form.get("note", "").strip())
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        abort(409, str(exc))
    session.commit()
    flash(f"Rollout {rollout_id}: {action} done.", "ok")
    return redirect(url_for("registry.rollout", rollout_id=rollout_id))
