"""The model registry: model packages the hub knows, and the rollouts that ship them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.db.models import TEXT_LEN, URL_LEN, Device, Model, Rollout, Site
from hub.services.common import NotFound, QueryError
from hub.services.packages import StoredPackage
from hub.store import is_sha
from shared.vocabulary import METHODS, PRECISIONS

_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


@dataclass(frozen=True, slots=True)
class RolloutView:
    id: str
    model: str
    version: str
    site: str | None  # None: every site
    state: str
    canary_devices: int
    note: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ModelView:
    id: int
    name: str
    version: str
    method: str
    classes: list[str]
    precision: str
    sha256: str
    size_bytes: int
    url: str
    notes: str
    created_at: datetime
    devices_running: int  # devices whose latest status names this model and version
    rollouts: list[RolloutView]
    parent_version: str = ""  # the version it was retrained from
    metrics: dict[str, Any] = field(default_factory=dict)  # summary_metrics() of its manifest


def _running(session: Session, models: list[Model]) -> dict[tuple[str, str], int]:
    pairs = {(m.name, m.version) for m in models}
    counts: dict[tuple[str, str], int] = {}
    for name, version in session.execute(select(Device.model_id, Device.model_version)):
        if (name, version) in pairs:
            counts[name, version] = counts.get((name, version), 0) + 1
    return counts


def _rollouts(session: Session, model_ids: list[int]) -> dict[int, list[RolloutView]]:
    out: dict[int, list[RolloutView]] = {i: [] for i in model_ids}
    rows = session.execute(
        select(Rollout, Model.name, Model.version, Site.name)
        .join(Rollout.model)
        .outerjoin(Site, Rollout.site_id == Site.id)
        .where(Rollout.model_id.in_(model_ids or [-1]))
        .order_by(Rollout.created_at.desc())
    )
    for r, name, version, site in rows:
        out[r.model_id].append(
            RolloutView(
                id=r.id,
                model=name,
                version=version,
                site=site,
                state=r.state,
                canary_devices=r.canary_devices,
                note=r.note,
                created_at=r.created_at,
                updated_at=r.updated_at,
            )
        )
    return out


def _views(session: Session, models: list[Model]) -> list[ModelView]:
    running = _running(session, models)
    rollouts = _rollouts(session, [m.id for m in models])
    return [
        ModelView(
            id=m.id,
            name=m.name,
            version=m.version,
            method=m.method,
            classes=[c for c in m.classes.split(",") if c],
            precision=m.precision,
            sha256=m.sha256,
            size_bytes=m.size_bytes,
            url=m.url,
            notes=m.notes,
            created_at=m.created_at,
            devices_running=running.get((m.name, m.version), 0),
            rollouts=rollouts[m.id],
            parent_version=m.parent_version,
            metrics=json.loads(m.metrics or "{}"),
        )
        for m in models
    ]


def list_models(session: Session, name: str | None = None) -> list[ModelView]:
    """Every registered model (or every version of one), newest first."""
    stmt = select(Model).order_by(Model.created_at.desc(), Model.id.desc())
    if name:
        stmt = stmt.where(Model.name == name)
    return _views(session, list(session.scalars(stmt)))


def model_detail(session: Session, model_id: int) -> ModelView:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"no model with id {model_id}")
    return _views(session, [model])[0]


@dataclass(frozen=True, slots=True)
class Lineage:
    """A model's family by `parent_version` among the versions of its name."""

    ancestors: list[ModelView]  # the oldest first, ending with its parent
    children: list[ModelView]  # versions made from it, the newest first


def lineage(session: Session, model: ModelView) -> Lineage:
    versions = {m.version: m for m in list_models(session, name=model.name)}
    ancestors: list[ModelView] = []
    parent = versions.get(model.parent_version)
    while parent is not None and parent.version != model.version and parent not in ancestors:
        ancestors.insert(0, parent)
        parent = versions.get(parent.parent_version)
    children = [m for m in versions.values() if m.parent_version == model.version and m.id != model.id]
    return Lineage(ancestors, children)


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the registry shows of a package's metrics: means, per-class image AUROC, cost, drop vs FP32."""
    m = metrics or {}
    mean = m.get("mean") or {}
    out: dict[str, Any] = {k: mean[k] for k in ("image_auroc", "pixel_auroc", "aupro") if _number(mean.get(k))}
    classes = {c: v.get("image_auroc") for c, v in (m.get("classes") or {}).items() if isinstance(v, dict)}
    if classes and all(_number(v) for v in classes.values()):
        out["classes"] = classes
    for key in ("latency_ms", "size_mb"):
        if _number(m.get(key)):
            out[key] = m[key]
    drop = m.get("drop_vs_fp32") or {}
    if _number(drop.get("image_auroc")):
        out["drop_vs_fp32"] = {k: v for k, v in drop.items() if _number(v)}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metrics(data: Mapping[str, Any]) -> dict[str, Any]:
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise QueryError("metrics must be an object (image_auroc, pixel_auroc, classes, latency_ms, ...)")
    text = json.dumps(metrics)
    if len(text) > 20_000:
        raise QueryError(f"metrics take {len(text)} characters as JSON, over the 20000 limit")
    return metrics


def _text(data: Mapping[str, Any], key: str, limit: int, required: bool = True) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise QueryError(f"{key} must be a string")
    value = value.strip()
    if required and not value:
        raise QueryError(f"{key} is required")
    if len(value) > limit:
        raise QueryError(f"{key} has {len(value)} characters, over the {limit} limit")
    return value


def register_model(session: Session, data: Mapping[str, Any], *, user_id: int | None) -> ModelView:
    """Add a model package to the registry from a JSON-like mapping; the caller commits.

    Keys: name, version, sha256, size_bytes, url (required); method, classes
    (a list of class names), precision, notes, parent_version, metrics (summary_metrics's shape).
    """
    return _views(session, [_create(session, data, user_id)])[0]


def register_package(
    session: Session, stored: StoredPackage, url: Callable[[int], str], *, notes: str, user_id: int | None
) -> ModelView:
    """Register an uploaded, verified package from its own manifest; `url(id)` is where the hub serves it."""
    m = stored.manifest
    data = {
        "name": m.model_id,
        "version": m.version,
        "sha256": stored.sha256,
        "size_bytes": stored.size_bytes,
        "url": "/",  # replaced below, once the id is known
        "method": m.method,
        "classes": list(m.classes),
        "precision": m.precision,
        "notes": notes,
        "parent_version": m.parent or "",
        "metrics": summary_metrics(m.metrics),
    }
    model = _create(session, data, user_id)
    model.url = url(model.id)
    session.flush()
    return _views(session, [model])[0]


def attach_package(
    session: Session, model_id: int, stored: StoredPackage, url: Callable[[int], str]
) -> ModelView:
    """Host an uploaded package for a model registered earlier; it must be the file the entry describes."""
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"no model with id {model_id}")
    m = stored.manifest
    if (m.model_id, m.version) != (model.name, model.version):
        raise QueryError(
            f"the upload is {m.model_id} {m.version}, but model {model_id} is "
            f"{model.name} {model.version}; upload it to its own entry or POST it to /api/models"
        )
    if stored.sha256 != model.sha256 or stored.size_bytes != model.size_bytes:
        raise QueryError(
            f"the upload (sha256 {stored.sha256[:12]}..., {stored.size_bytes} bytes) is not the file "
            f"registered (sha256 {model.sha256[:12]}..., {model.size_bytes} bytes); register the new "
            "file under a new version"
        )
    model.url = url(model.id)
    session.flush()
    return _views(session, [model])[0]


def _create(session: Session, data: Mapping[str, Any], user_id: int | None) -> Model:
    name = _text(data, "name", TEXT_LEN)
    version = _text(data, "version", 64)
    if not _VERSION.match(version):
        raise QueryError(f"version {version!r}: use letters, digits, '.', '_', '+' or '-'")
    sha = _text(data, "sha256", 64).lower()
    if not is_sha(sha):
        raise QueryError("sha256 must be 64 hexadecimal digits (the package file's sha256)")
    url = _text(data, "url", URL_LEN)
    if not url.startswith(("http://", "https://", "/")):
        raise QueryError("url must be an http(s) URL or a path on the hub starting with '/'")
    size = data.get("size_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise QueryError("size_bytes must be a positive whole number")
    method = _text(data, "method", 32, required=False)
    if method and method not in METHODS:
        raise QueryError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    precision = _text(data, "precision", 16, required=False)
    if precision and precision not in PRECISIONS:
        raise QueryError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    classes = data.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) and c and "," not in c for c in classes):
        raise QueryError("classes must be a list of class names (without commas)")
    if session.scalar(select(Model.id).where(Model.name == name, Model.version == version)):
        raise QueryError(f"model {name!r} version {version!r} is registered already")
    model = Model(
        name=name,
        version=version,
        sha256=sha,
        size_bytes=size,
        url=url,
        method=method,
        precision=precision,
        classes=",".join(classes),
        notes=_text(data, "notes", 4000, required=False),
        parent_version=_text(data, "parent_version", 64, required=False),
        metrics=json.dumps(_metrics(data)),
        created_by_id=user_id,
    )
    session.add(model)
    session.flush()
    return model
