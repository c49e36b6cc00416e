"""JSON API for services and scripts: devices, results, reviews, training data, models, rollouts.

Authenticate with ``Authorization: Bearer <token>`` (`kdfleet hub add-token
NAME --role ROLE`) or a dashboard session. Times are ISO 8601 in UTC; images
are URLs under /images/. Lists page with `before` (the `next` URL in each
answer). The OpenAPI 3 description is at /api/openapi.json.

The module's length is its number of routes, each a few lines over a service
function. They share one blueprint, whose endpoint names ("api.result",
"api.model_package", ...) the templates and the API's own links use, so they
stay in one module, read beside openapi.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from flask import Blueprint, abort, current_app, jsonify, request, send_file, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestedRangeNotSatisfiable

from hub.services import devices, registry, results, retraining, reviews, rollouts
from hub.services.common import NotFound, QueryError, parse_limit, parse_time
from hub.services.packages import PackageStore, StagedPackage, UploadError
from hub.services.results import ResultFilter
from hub.web import openapi
from hub.web.auth import current, requires
from hub.web.db import get_session
from hub.web.fleet import silent_after
from hub.web.params import result_id as checked_result_id
from shared.vocabulary import REVIEW_FALSE_ALARM

bp = Blueprint("api", __name__, url_prefix="/api")


def plain(value: Any) -> Any:
    """Dataclasses, lists and datetimes as JSON values."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _image_url(sha: str | None) -> str | None:
    return url_for("images.get", sha=sha) if sha else None


def _result(r: results.ResultView) -> dict[str, Any]:
    out = plain(r)
    out["url"] = url_for("results.detail", result_id=r.id)
    for name in ("heatmap", "thumbnail", "frame"):
        out[f"{name}_url"] = _image_url(out.pop(f"{name}_sha"))
    for crop in out["crops"]:
        crop["image_url"] = _image_url(crop.pop("image_sha"))
    return out


def review_json(v: reviews.ReviewView) -> dict[str, Any]:
    """A review as the API gives it, with its result's image URLs."""
    out = plain(v)
    out["result_url"] = url_for("api.result", result_id=v.result_id)
    for name in ("heatmap", "thumbnail", "frame"):
        out[f"{name}_url"] = _image_url(out.pop(f"{name}_sha"))
    # for training: the best picture of the frame there is; /images/ takes sessions only, so token
    # clients (the trainer) fetch the same bytes under /api/images/
    out["image_url"] = out["frame_url"] or out["thumbnail_url"]
    best = v.frame_sha or v.thumbnail_sha
    out["image_api_url"] = url_for("api.image", sha=best) if best else None
    return out


def _device(d: devices.DeviceView) -> dict[str, Any]:
    return plain(d) | {"online": d.online, "url": url_for("api.device", site=d.site, name=d.name)}


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "send a JSON object with Content-Type: application/json")
    return body


@bp.get("/health")
def health() -> ResponseReturnValue:
    devices.check_database(get_session())
    return jsonify(status="ok")


@bp.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    return jsonify(openapi.document(request.host_url.rstrip("/")))


@bp.get("/devices")
def device_list() -> ResponseReturnValue:
    site = request.args.get("site") or None
    found = devices.list_devices(get_session(), site=site, silent_after=silent_after())
    return jsonify(devices=[_device(d) for d in found])


@bp.get("/devices/<site>/<name>")
def device(site: str, name: str) -> ResponseReturnValue:
    session = get_session()
    found = devices.device_detail(session, site, name, silent_after=silent_after())
    if found is None:
        abort(404, f"no device {name!r} at site {site!r}")
    activity = devices.device_activity(session, site, name)
    return jsonify(_device(found) | {"activity": plain(activity)})


@bp.get("/results")
def result_list() -> ResponseReturnValue:
    try:
        f = ResultFilter.from_query(request.args)
    except QueryError as exc:
        abort(400, str(exc))
    page = results.latest_results(get_session(), f)
    next_url = (
        url_for("api.result_list", **f.query_args(before=page.next_before))
        if page.next_before
        else None
    )
    return jsonify(results=[_result(r) for r in page.items], next=next_url)


@bp.get("/results/<result_id>")
def result(result_id: str) -> ResponseReturnValue:
    found = results.result_detail(get_session(), checked_result_id(result_id))
    if found is None:
        abort(404, f"no result with id {result_id!r}")
    return jsonify(_result(found))


@bp.get("/results/<result_id>/reviews")
def result_reviews(result_id: str) -> ResponseReturnValue:
    session = get_session()
    if results.result_detail(session, checked_result_id(result_id)) is None:
        abort(404, f"no result with id {result_id!r}")
    return jsonify(reviews=[review_json(v) for v in reviews.reviews_of(session, result_id)])


@bp.post("/results/<result_id>/reviews")
@requires("operator")
def review_create(result_id: str) -> ResponseReturnValue:
    checked_result_id(result_id)
    body = _json_body()
    principal = current()
    assert principal is not None
    session = get_session()
    try:
        note = body.get("note", "")
        if not isinstance(note, str):
            raise QueryError("note must be a string")
        review_id = reviews.add_review(
            session,
            result_id,
            str(body.get("label", "")),
            note,
            user_id=principal.id if principal.kind == "user" else None,
        )
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    created = next(v for v in reviews.reviews_of(session, result_id) if v.id == review_id)
    return jsonify(review_json(created)), 201


def _review_query() -> dict[str, Any]:
    args = request.args
    try:
        before = args.get("before") or None
        if before is not None and not before.isdigit():
            raise QueryError(f"before must be a review id, not {before!r}")
        label = args.get("label") or None
        return {
            "label": reviews.check_label(label) if label else None,
            "cls": args.get("cls") or None,
            "since": parse_time(args["since"], "since") if args.get("since") else None,
            "before": int(before) if before else None,
            "limit": parse_limit(args.get("limit") or None),
        }
    except QueryError as exc:
        abort(400, str(exc))


def training_query() -> dict[str, Any]:
    """The training data's query string (label, by default false_alarm, cls, since, before, limit); 400 if bad."""
    query = _review_query()
    query["label"] = query["label"] or REVIEW_FALSE_ALARM
    return query


def _review_page(endpoint: str, page: reviews.ReviewPage, query: dict[str, Any]) -> dict[str, Any]:
    args = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in query.items() if v}
    next_url = url_for(endpoint, **(args | {"before": page.next_before})) if page.next_before else None
    return {"next": next_url, "items": [review_json(v) for v in page.items]}


@bp.get("/reviews")
def review_list() -> ResponseReturnValue:
    query = _review_query()
    page = reviews.list_reviews(get_session(), **query)
    body = _review_page("api.review_list", page, query)
    return jsonify(reviews=body["items"], next=body["next"])


@bp.get("/training-data")
def training_data() -> ResponseReturnValue:
    """Results whose latest review is `label` (default false_alarm): new normal images."""
    query = training_query()
    page = reviews.training_data(get_session(), **query)
    body = _review_page("api.training_data", page, query)
    return jsonify(items=body["items"], next=body["next"])


@bp.get("/images/<sha>")
def image(sha: str) -> ResponseReturnValue:
    """An image of the store, as /images/<sha> serves it, for token clients."""
    from hub.web.images import get

    return get(sha)


@bp.get("/models")
def model_list() -> ResponseReturnValue:
    found = registry.list_models(get_session(), name=request.args.get("name") or None)
    return jsonify(models=plain(found))


@bp.get("/models/<int:model_id>")
def model(model_id: int) -> ResponseReturnValue:
    try:
        return jsonify(plain(registry.model_detail(get_session(), model_id)))
    except NotFound as exc:
        abort(404, str(exc))


def _user_id() -> int | None:
    principal = current()
    assert principal is not None
    return principal.id if principal.kind == "user" else None


def package_store() -> PackageStore:
    """The app's package store: <HUB_DATA_DIR>/packages. Uploads must be signed by one of HUB_TRUSTED_KEYS
    (public key files); with none, every upload is refused unless HUB_ALLOW_UNSIGNED is set."""
    store = current_app.extensions.get("hub.packages")
    if store is None:
        from shared.package import load_public_key

        keys = [load_public_key(k) for k in current_app.config.get("HUB_TRUSTED_KEYS") or ()]
        root = Path(current_app.config["HUB_DATA_DIR"]) / "packages"
        store = current_app.extensions["hub.packages"] = PackageStore(
            root, keys, allow_unsigned=bool(current_app.config.get("HUB_ALLOW_UNSIGNED")))
    return store


def _package_url(model_id: int) -> str:
    return url_for("api.model_package", model_id=model_id)


@contextmanager
def _upload() -> Iterator[StagedPackage]:
    """The uploaded package (multipart field `package`, or the raw application/octet-stream body), verified
    and staged: the caller keeps it once registered; a refused upload leaves no file behind."""
    stream: IO[bytes]
    if request.mimetype == "multipart/form-data":
        if "package" not in request.files:
            abort(400, "send the .kdpkg file in the multipart field 'package'")
        stream = request.files["package"].stream
    elif request.mimetype == "application/octet-stream":
        stream = request.stream
    else:
        abort(400, "send the package as multipart/form-data (field 'package') or application/octet-stream")
    try:
        with package_store().upload(stream) as staged:
            yield staged
    except UploadError as exc:
        abort(400, str(exc))


@bp.post("/models")
@requires("admin")
def model_create() -> ResponseReturnValue:
    """Register a model: a JSON description of a package hosted elsewhere, or an uploaded package."""
    session = get_session()
    try:
        if request.mimetype == "multipart/form-data":
            with _upload() as staged:
                created = registry.register_package(
                    session, staged.package, _package_url, notes=request.form.get("notes", ""), user_id=_user_id()
                )
                staged.keep()
        else:
            created = registry.register_model(session, _json_body(), user_id=_user_id())
    except QueryError as exc:
        session.rollback()
        abort(400, str(exc))
    session.commit()
    return jsonify(plain(created)), 201


@bp.post("/models/<int:model_id>/package")
@requires("admin")
def model_package_upload(model_id: int) -> ResponseReturnValue:
    """Host the package file of a model registered earlier (same sha256 and size)."""
    session = get_session()
    try:
        registry.model_detail(session, model_id)
        with _upload() as staged:
            updated = registry.attach_package(session, model_id, staged.package, _package_url)
            staged.keep()
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        session.rollback()
        abort(400, str(exc))
    session.commit()
    return jsonify(plain(updated))


@bp.get("/models/<int:model_id>/package")
def model_package(model_id: int) -> ResponseReturnValue:
    """The package file; honours Range (206) so devices resume broken downloads."""
    try:
        model = registry.model_detail(get_session(), model_id)
    except NotFound as exc:
        abort(404, str(exc))
    path = package_store().find(model.sha256)
    if path is None:
        abort(404, f"model {model_id} ({model.name} {model.version}) is registered but this hub does not host "
                   f"its package; upload it with POST /api/models/{model_id}/package")
    try:
        response = send_file(path, mimetype="application/x-tar", as_attachment=True, conditional=True,
                             download_name=f"{model.name}-{model.version}.kdpkg", etag=model.sha256, max_age=0)
    except RequestedRangeNotSatisfiable:
        # answered here, not by the app's JSON error handler, to keep the Content-Range a resuming client needs
        size = path.stat().st_size
        response = jsonify(error="Requested Range Not Satisfiable", status=416,
                           detail=f"the package has {size} bytes; a range must start below that")
        response.status_code = 416
        response.headers["Content-Range"] = f"bytes */{size}"
    response.headers["X-Package-Sha256"] = model.sha256
    return response


def _number(body: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    """body[key] as `kind` (int or float), `default` when absent or null; QueryError otherwise."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise QueryError(f"{key} must be a {'whole number' if kind is int else 'number'}, not {value!r}")
    return kind(value)


ROLLOUT_KEYS = ("model_id", "site", "devices", "canary", "wave_size", "soak_s", "max_failures", "max_anomaly_rate",
                "max_anomaly_rise", "max_latency_ms", "wave_timeout_s", "queue", "note")


def _known_keys(body: dict[str, Any], accepted: tuple[str, ...]) -> None:
    """QueryError naming any key of `body` not in `accepted`, and the accepted ones."""
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        raise QueryError(f"unknown key(s) {', '.join(map(repr, unknown))}; this request takes "
                         f"{', '.join(accepted)}")


def _rollout_request(body: dict[str, Any]) -> tuple[int, rollouts.Policy, dict[str, Any]]:
    """(model id, policy, start_rollout keywords) from a POST /api/rollouts body."""
    _known_keys(body, ROLLOUT_KEYS)
    model_id = body.get("model_id")
    if isinstance(model_id, bool) or not isinstance(model_id, int):
        raise QueryError("model_id must be the registry id of the model to ship (GET /api/models lists them)")
    canary = body.get("canary", 1)
    if isinstance(canary, bool) or not isinstance(canary, (int, str)):
        raise QueryError("canary must be a device count (2) or a percentage (\"10%\")")
    default = rollouts.Policy()
    policy = rollouts.Policy(
        canary,
        _number(body, "wave_size", default.wave_size, int),
        _number(body, "soak_s", default.soak_s, float),
        _number(body, "max_failures", default.max_failures, int),
        _number(body, "max_anomaly_rate", None, float),
        _number(body, "max_latency_ms", None, float),
        _number(body, "max_anomaly_rise", None, float),
        _number(body, "wave_timeout_s", default.wave_timeout_s, float),
    )
    site, devices_, note, queue = body.get("site"), body.get("devices"), body.get("note", ""), body.get("queue", False)
    if site is not None and not isinstance(site, str):
        raise QueryError("site must be a site name")
    if devices_ is not None and not (isinstance(devices_, list) and all(isinstance(d, str) for d in devices_)):
        raise QueryError("devices must be a list of device names")
    if not isinstance(note, str):
        raise QueryError("note must be a string")
    if not isinstance(queue, bool):
        raise QueryError("queue must be true or false")
    return model_id, policy, {"site": site or None, "devices": devices_ or None, "note": note, "queue": queue}


def _rollout_view(rollout_id: str) -> dict[str, Any]:
    detail = rollouts.rollout_detail(get_session(), rollout_id, silent_after=silent_after())
    return plain(detail) | {"counts": detail.counts(), "url": url_for("registry.rollout", rollout_id=rollout_id)}


@bp.post("/rollouts")
@requires("admin")
def rollout_create() -> ResponseReturnValue:
    """Start a rollout of a registry model, as `kdfleet hub rollout start` does; `kdfleet hub serve` drives it."""
    session = get_session()
    try:
        model_id, policy, options = _rollout_request(_json_body())
        rollout_id = rollouts.start_rollout(session, model_id, policy, user_id=_user_id(), **options)
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    return jsonify(_rollout_view(rollout_id)), 201


@bp.get("/rollouts/<rollout_id>")
def rollout_status(rollout_id: str) -> ResponseReturnValue:
    """One rollout: its state and note, its policy, and each device's wave, update state and connection."""
    try:
        return jsonify(_rollout_view(rollout_id))
    except NotFound as exc:
        abort(404, str(exc))


ROLLOUT_ACTIONS = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}


@bp.post("/rollouts/<rollout_id>/<action>")
@requires("admin")
def rollout_action(rollout_id: str, action: str) -> ResponseReturnValue:
    """Pause, resume or abort a rollout (optional JSON body {"note": "why"}); 409 when its state does not allow it."""
    if action not in ROLLOUT_ACTIONS:
        abort(404, f"no rollout action {action!r}; use pause, resume or abort")
    body = request.get_json(silent=True) if request.content_length else {}
    if not isinstance(body, dict):
        abort(400, "send nothing, or a JSON object {\"note\": \"why\"} with Content-Type: application/json")
    note = body.get("note", "")
    try:
        _known_keys(body, ("note",))
        if not isinstance(note, str):
            raise QueryError("note must be a string")
    except QueryError as exc:
        abort(400, str(exc))
    session = get_session()
    try:
        ROLLOUT_ACTIONS[action](session, rollout_id, note.strip())
    except NotFound as exc:
        abort(404, str(exc))
    except QueryError as exc:   # the rollout's state does not allow it
        abort(409, str(exc))
    session.commit()
    return jsonify(_rollout_view(rollout_id))


@bp.get("/retrain-cycles")
def retrain_cycles() -> ResponseReturnValue:
    """The retraining service's latest cycles, newest first (?limit=, default 20)."""
    try:
        limit = parse_limit(request.args.get("limit"), default=20, maximum=200)
    except QueryError as exc:
        abort(400, str(exc))
    return jsonify(cycles=plain(retraining.recent_cycles(get_session(), limit)))


@bp.post("/retrain-cycles")
@requires("admin")
def retrain_cycle_report() -> ResponseReturnValue:
    """A cycle's report from `kdfleet trainer serve`: outcome and reason, shown on the dashboard."""
    session = get_session()
    try:
        view = retraining.record_cycle(session, _json_body())
    except QueryError as exc:
        abort(400, str(exc))
    session.commit()
    return jsonify(plain(view)), 201
