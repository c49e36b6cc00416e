"""Lineage: the model the fleet runs, the release to fine-tune from, and the version a candidate gets.

The base follows the fleet (asked from the hub: a rollback moves it); a
candidate's manifest names the fleet's version as parent, and a version
once built is never reused.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

from trainer.retrain.config import ServeConfig
from trainer.retrain.hub import Hub, ServeError
from trainer.retrain.workdir import safe_name


def fleet_model(hub: Hub, cfg: ServeConfig) -> tuple[str, str] | None:
    """(model, version) most of the targeted devices run, as they last told the hub; None when none says.

    With --model-id only devices running that model count."""
    devices = hub.get_json("/api/devices", site=cfg.site)["devices"]
    if cfg.devices:
        devices = [d for d in devices if d["name"] in cfg.devices]
    running = collections.Counter((d["model_id"], d["model_version"]) for d in devices
                                  if d["model_id"] and d["model_version"]
                                  and (cfg.model_id is None or d["model_id"] == cfg.model_id))
    return running.most_common(1)[0][0] if running else None


def base_model(cfg: ServeConfig, state: dict[str, Any], fleet: tuple[str, str] | None) -> dict[str, Any]:
    """The model to fine-tune and gate against: the release of the version the fleet runs.

    --base is the release of --base-version, or, when that is not given, of the version the fleet ran at
    the first cycle. Every published candidate becomes a release. So a failed rollout or a rollback,
    which leave the fleet on an older version, move the base back with it."""
    releases = state["releases"]
    if cfg.base_version:
        state["base_version"] = cfg.base_version
    elif state["base_version"] is None:
        if fleet is None:
            raise ServeError("no targeted device reports its model, so the version --base was released as is "
                             "unknown: give --base-version (or wait until the devices have connected)")
        state["base_version"] = fleet[1]
    releases.setdefault(state["base_version"], {"checkpoint": str(cfg.base), "package": None})
    if cfg.base_version:   # told now: --base is this version's checkpoint
        releases[state["base_version"]]["checkpoint"] = str(cfg.base)
    version = fleet[1] if fleet else state["base_version"]
    if version not in releases:
        raise ServeError(f"the fleet runs {fleet[0]} {version}, and this service has no checkpoint of it (it has "
                         f"{', '.join(sorted(releases))}); give --base its checkpoint and --base-version {version}")
    return {"name": fleet[0] if fleet else cfg.model_id, "version": version, **releases[version]}


def _semver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3]) or (0,)


def next_version(hub: Hub, name: str, parent: str, built: list[list[str]]) -> str:
    """One patch above the newest version of `name` the hub has, this service ever built (refused or
    failed ones too: a version names one package only), or `parent`."""
    found = [m["version"] for m in hub.get_json("/api/models", name=name)["models"]]
    mine = [v for n, v in built if n == name]
    newest = max([parent, *found, *mine], key=_semver)
    major, minor, patch = (*_semver(newest), 0, 0)[:3]
    return f"{major}.{minor}.{patch + 1}"


def fetch_package(hub: Hub, name: str | None, version: str, workdir: Path) -> Path | None:
    """The package of `name` `version` as the hub hosts it (cached in WORKDIR/packages), for the gate to
    judge the model the fleet runs with its shipped thresholds; None when the hub has no such file."""
    from shared.package import file_sha256

    if not name:
        return None
    found = [m for m in hub.get_json("/api/models", name=name)["models"] if m["version"] == version]
    if not found:
        return None
    path = workdir / "packages" / f"{safe_name(name)}-{safe_name(version)}.kdpkg"
    if path.exists() and file_sha256(path) == found[0]["sha256"]:
        return path
    try:
        data, _ = hub.request("GET", found[0]["url"])
    except ServeError as exc:
        if exc.status == 404:   # registered, but hosted elsewhere or not at all
            return None
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if file_sha256(path) != found[0]["sha256"]:
        path.unlink()
        raise ServeError(f"the hub's package of {name} {version} does not have its registered sha256")
    return path
