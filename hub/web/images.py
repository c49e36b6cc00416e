"""Images from the content-addressed store: heat maps, thumbnails, frames, crops."""

from __future__ import annotations

from flask import Blueprint, Response, abort, request

from hub.services import results
from hub.web.db import get_store

bp = Blueprint("images", __name__, url_prefix="/images")

ONE_YEAR_S = 365 * 24 * 3600  # a content address never changes what it names


@bp.get("/<sha>")
def get(sha: str) -> Response:
    stored = results.image(get_store(), sha)
    if stored is None:
        abort(404, f"no image {sha!r} in the store (retention may have deleted it)")
    response = Response(stored.data, mimetype=stored.media_type)
    response.set_etag(stored.sha)
    response.cache_control.private = True  # images are for signed-in users only
    response.cache_control.max_age = ONE_YEAR_S
    response.cache_control.immutable = True
    return response.make_conditional(request)
