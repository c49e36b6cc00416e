"""What the hub's commands share: their flags, the settings those make, the database and the image store.

A command fails with `CliError` when it has one line to say and no traceback
to show; hub.cli prints it and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from hub.config import HubConfig, load
from hub.db.session import Database, check_schema, sqlite_file
from hub.store import Images
from shared.config import ConfigError
from shared.logs import add_log_arguments

log = logging.getLogger("hub")


class CliError(RuntimeError):
    """A failure to report in one line, without a traceback."""


# -- flags ----------------------------------------------------------------------------


def common_flags(p: argparse.ArgumentParser) -> None:
    """--config, --db and the log flags: every command that reads the hub's settings."""
    p.add_argument(
        "--config", metavar="FILE", help="TOML settings file (see hub/config.py); flags override it"
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="database URL: sqlite:///path/hub.db (default "
        "sqlite:///var/hub/hub.db) or postgresql+psycopg://user@host/dbname",
    )
    log_flags(p)


def log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_log_arguments(p)


def data_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="image store and secret key (default var/hub)")


def ingest_broker_flags(p: argparse.ArgumentParser) -> None:
    """The broker and how ingest reads it: serve, ingest and check."""
    p.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT broker, mqtt://[user:pass@]host[:port] or mqtts://... "
        "(default mqtt://127.0.0.1:1883)",
    )
    p.add_argument("--site", help="ingest one site's messages only (default: every site)")
    p.add_argument(
        "--client-id",
        help="MQTT client id; give each ingest process its own (default kdfleet-hub-<hostname>)",
    )
    p.add_argument(
        "--shared-group",
        metavar="NAME",
        help="MQTT 5 shared-subscription group that ingest "
        "processes split the load in (default hub; '' to have every process read everything)",
    )


def hub_broker_flag(p: argparse.ArgumentParser) -> None:
    """The broker with the hub's own account: the commands that write Mosquitto's files."""
    p.add_argument(
        "--broker",
        metavar="URL",
        help="the hub's broker URL with its own account, mqtt://USER:PASSWORD@host:port",
    )


# -- settings -------------------------------------------------------------------------


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def settings(args: argparse.Namespace) -> HubConfig:
    """The config file's settings with the command-line flags applied on top, validated."""
    cfg = load(args.config)
    cfg = dataclasses.replace(
        cfg,
        **_given(args, "db", "data_dir", "broker", "trusted_keys", "allow_unsigned"),
        ingest=dataclasses.replace(cfg.ingest, **_given(args, "site", "client_id", "shared_group")),
        web=dataclasses.replace(cfg.web, **_given(args, "host", "port")),
        retention=dataclasses.replace(
            cfg.retention, **_given(args, "results_days", "images_days", "images_max_gb")
        ),
    )
    cfg.validate()
    cfg.broker_config()  # the URL and [broker_tls] together
    return cfg


# -- the database and the image store -------------------------------------------------


def open_db(cfg: HubConfig, *, check: bool = True) -> Database:
    """The hub's database; with `check` (every command but init-db) it must exist at the newest schema,
    and a SQLite file that does not exist is not created."""
    path = sqlite_file(cfg.db) if check else None
    if path is not None and not path.exists():
        raise CliError(
            f"no hub database at {path}: give the hub's --config FILE (its `db`) or --db URL, "
            "or create one with `kdfleet hub init-db`"
        )
    db = Database(cfg.db)
    try:
        if check:
            check_schema(db)
    except OperationalError as exc:
        db.dispose()
        raise CliError(
            f"cannot reach the database {db.display_url}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None
    return db


def open_images(cfg: HubConfig) -> Images:
    try:
        store = cfg.open_images()
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    log.info("images in %s", store.describe())
    return store
