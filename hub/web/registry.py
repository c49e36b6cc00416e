"""Models: the registry of model packages, which devices run them, and their rollouts."""

from __future__ import annotations

from flask import Blueprint, render_template
from flask.typing import ResponseReturnValue

from hub.services import registry
from hub.web.db import get_session

bp = Blueprint("registry", __name__, url_prefix="/models")


@bp.get("/")
def index() -> ResponseReturnValue:
    return render_template("registry/index.html", models=registry.list_models(get_session()))
