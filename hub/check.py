"""`kdfleet hub check`: could this hub start? Its database, image store, trusted keys and broker, each
reported ok or FAIL with what to do (as `kdfleet agent check` does for a station)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sqlalchemy.exc import OperationalError

from hub.config import HubConfig
from hub.db.session import Database, SchemaError, check_schema, head_revision, sqlite_file
from shared.checks import Checklist
from shared.config import ConfigError

BROKER_WAIT_S = 5.0


def check_hub(cfg: HubConfig, checks: Checklist, broker_wait_s: float = BROKER_WAIT_S) -> None:
    """Report each part `serve` needs; never raises for what it checks."""
    label, error = _database(cfg)
    checks.report(label, error)
    _images(cfg, checks)
    try:
        cfg.load_trusted_keys()
        checks.report(f"packages: {cfg.package_policy()}")
    except ConfigError as exc:
        checks.report("trusted keys", str(exc))
    checks.report(f"broker {cfg.broker_config().url}", _broker(cfg, broker_wait_s))


def _database(cfg: HubConfig) -> tuple[str, str | None]:
    """(what was checked, what is wrong or None): reachable and at the newest schema revision."""
    path = sqlite_file(cfg.db)
    if path is not None and not path.exists():
        return f"database {path}", "no such file: create it with `kdfleet hub init-db`"
    db = Database(cfg.db)
    label = f"database {db.display_url} at revision {head_revision()}"
    try:
        check_schema(db)
    except SchemaError as exc:
        return label, str(exc)
    except OperationalError as exc:
        return label, f"cannot reach it: {str(exc.orig).strip().splitlines()[0]}"
    finally:
        db.dispose()
    return label, None


def _images(cfg: HubConfig, checks: Checklist) -> None:
    """The store [images] chooses: a folder the hub may write in, or a bucket that answers."""
    if cfg.images.backend == "folder":
        checks.report(f"image store {cfg.images_dir}", _writable(cfg.images_dir))
        return
    try:
        store = cfg.open_images()   # asks the object store for the bucket
    except ConfigError as exc:
        checks.report("image store", str(exc))
        return
    checks.report(f"image store {store.describe()}")


def _writable(folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror}): give --data-dir a folder the hub may write"
    return None


def _broker(cfg: HubConfig, wait_s: float) -> str | None:
    from shared.mqtt import MqttLink

    link = MqttLink(cfg.broker_config(), f"kdfleet-hub-check-{os.getpid()}").start()
    try:
        return None if link.wait_connected(wait_s) else (link.fatal or f"no connection within {wait_s:g} s")
    finally:
        link.stop()
