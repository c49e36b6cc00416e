"""Models: the registry of model packages, a page per model (its metrics, lineage, versions and the
devices running it), and their rollouts."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from hub.services import devices, registry, retraining, rollouts
from hub.services.common import NotFound, QueryError
from hub.web.auth import requires
from hub.web.db import get_session
from hub.web.fleet import silent_after
from shared.manifest import Manifest

bp = Blueprint("registry", __name__, url_prefix="/models")
ACTIONS = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}


def cli_target() -> str:
    """The flags that point `kdfleet hub` commands at this hub's database (HUB_CLI_TARGET, which
    `hub serve` sets from its own --config and --db); a placeholder when unknown."""
    return current_app.config.get("HUB_CLI_TARGET") or "--config HUB.TOML"


@bp.get("/")
def index() -> ResponseReturnValue:
    session = get_session()
    return render_template("registry/index.html", models=registry.list_models(session),
                           cycles=retraining.recent_cycles(session), cli_target=cli_target(),
                           sites=devices.site_names(session))


def hosted_manifest(sha: str) -> tuple[Manifest, str | None] | None:
    """The manifest and signer of the package this hub hosts under `sha`, or None. Read once per
    package: the file is content-addressed, so what it says never changes."""
    from hub.web.api import package_store
    from shared.package import PackageError, read_package

    cache = current_app.extensions.setdefault("hub.manifests", {})
    if sha not in cache:
        store = package_store()
        path = store.find(sha)
        if path is None:
            return None
        try:
            package = read_package(path, trusted_keys=store.trusted or None)
        except PackageError:
            return None   # no longer trusted, or damaged on disk: the page shows the registry's summary
        cache[sha] = (package.manifest, package.signed_by)
    return cache[sha]


@bp.get("/<int:model_id>")
def model(model_id: int) -> ResponseReturnValue:
    session = get_session()
    try:
        found = registry.model_detail(session, model_id)
    except NotFound as exc:
        abort(404, str(exc))
    hosted = hosted_manifest(found.sha256)
    running = devices.list_devices(session, model=(found.name, found.version), silent_after=silent_after())
    # where a version of it runs is where it would be rolled out
    sites = sorted({d.site for d in devices.list_devices(session, model=(found.name, None))}) \
        or devices.site_names(session)
    return render_template(
        "registry/model.html",
        m=found,
        manifest=hosted[0] if hosted else None,
        signed_by=hosted[1] if hosted else None,
        lineage=registry.lineage(session, found),
        versions=registry.list_models(session, name=found.name),
        running=running,
        cli_target=cli_target(),
        site=sites[0] if len(sites) == 1 else None,
    )


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
