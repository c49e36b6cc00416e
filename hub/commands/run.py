"""Running the hub: `serve` (ingest and the dashboard), `ingest` (a worker alone) and `check`.

The processes themselves are hub.server's; these commands make their settings,
open the database and the image store, and hand them over.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from hub import server
from hub.commands.common import (
    common_flags,
    data_dir_flag,
    ingest_broker_flags,
    open_db,
    open_images,
    settings,
)
from hub.config import HubConfig
from hub.db.session import sqlite_file
from shared.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="ingest from MQTT and serve the dashboard",
        description="Run the ingest worker and the web dashboard in one process.",
    )
    common_flags(p)
    data_dir_flag(p)
    ingest_broker_flags(p)
    p.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the plant network)"
    )
    p.add_argument("--port", type=int, help="TCP port (default 8080)")
    p.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        metavar="PUB",
        action="append",
        help="a public key file one of which must have signed every uploaded package (repeatable; "
        "replaces trusted_keys of the config)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_const",
        const=True,
        help="take unsigned package uploads when no key is trusted (development only)",
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "ingest",
        help="ingest from MQTT only (run several to scale out)",
        description="Run only the ingest worker; several processes with the same shared "
        "group split the results between them on an MQTT 5 broker.",
    )
    common_flags(p)
    data_dir_flag(p)
    ingest_broker_flags(p)
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser(
        "check",
        help="check database, image store, trusted keys and broker; exit 1 if any fails",
        description="Check what `serve` needs: the database at the newest schema, a writable image "
        "store, the trusted keys and the broker. One line each, ok or FAIL with what to do.",
    )
    common_flags(p)
    data_dir_flag(p)
    ingest_broker_flags(p)
    p.add_argument("--trusted-key", dest="trusted_keys", metavar="PUB", action="append",
                   help="a public key package uploads must be signed with (repeatable)")
    p.set_defaults(handler=cmd_check)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = settings(args)
    target = cli_target(args, cfg)
    stop = server.stop_on_signals()   # before start-up, so a stop during it is clean too
    cfg.load_trusted_keys()  # a missing or unreadable key file stops the start, naming it
    db = open_db(cfg)
    server.run_serve(cfg, db, open_images(cfg), stop, target)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = settings(args)
    stop = server.stop_on_signals()
    db = open_db(cfg)
    server.run_ingest(cfg, db, open_images(cfg), stop)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """`kdfleet hub check`: the settings first (a bad one ends the check there), then `hub.check`."""
    from hub.check import check_hub
    from shared.checks import Checklist

    checks = Checklist()
    try:
        cfg = settings(args)
    except ConfigError as exc:
        checks.report("config", str(exc))
        return checks.exit_code
    checks.report("config")
    check_hub(cfg, checks)
    return checks.exit_code


def cli_target(args: argparse.Namespace, cfg: HubConfig) -> str:
    """The flags that point other `kdfleet hub` commands (a rollout the Models page suggests) at this
    hub's database: its config file, made absolute, and --db when given or when there is no config;
    a relative SQLite path made absolute, a password in the URL masked."""
    from sqlalchemy.engine import make_url

    from hub.db.session import normalise_url

    parts = []
    if args.config:
        parts += ["--config", str(Path(args.config).resolve())]
    if args.db or not args.config:
        url = make_url(normalise_url(cfg.db))
        path = sqlite_file(cfg.db)
        if path is not None:
            url = url.set(database=str(path.resolve()))
        parts += ["--db", url.render_as_string(hide_password=True)]
    return shlex.join(parts)
