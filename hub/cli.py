"""The hub's command line (``kdfleet hub COMMAND`` or ``python -m hub COMMAND``).

serve, ingest: run the hub; init-db: create or upgrade the schema; add-user,
create-admin: dashboard users; add-token, revoke-token: API tokens for
services; add-device, revoke-device, write-mqtt-auth: broker credentials and
ACL; make-certs: a CA and the broker's TLS certificate; bridge-config: a site
broker's bridge to a central one; prune: the retention policy;
export-training: reviewed results as a training set.

This module builds the parser and runs the chosen command; the commands
themselves live in hub.commands, one module per group, each registering its
own subcommands. Settings come from an optional TOML file (``--config``, see
hub.config) and are overridden by the flags given (`settings`); `serve` and
`ingest` run in hub.server, `check` is hub.check.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hub import server
from hub.commands import accounts, broker, data, database, rollout, run
from hub.commands.common import CliError, settings
from hub.commands.run import cli_target
from hub.db.session import SchemaError
from shared.config import ConfigError
from shared.logs import setup_logging

__all__ = ["CliError", "build_parser", "cli_target", "main", "settings"]

# in the order `kdfleet hub --help` lists their commands
GROUPS = (run, rollout, database, accounts, broker, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdfleet hub",
        description="kdfleet hub: ingest inspection results from MQTT into SQL "
        "and serve the dashboard (also `python -m hub`).",
        epilog="First run: `kdfleet hub init-db`, `kdfleet hub create-admin NAME`, "
        "`kdfleet hub serve`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, args.log_level)  # --log-json, else KDFLEET_LOG_JSON
    if args.log_level != "DEBUG":  # Alembic narrates every step at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"hub: configuration error: {exc}", file=sys.stderr)
        return 2
    except (CliError, server.StartError, SchemaError, ValueError) as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 1
