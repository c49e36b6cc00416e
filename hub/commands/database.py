"""`kdfleet hub init-db`: create the hub's database schema or upgrade it to the newest revision."""

from __future__ import annotations

import argparse

from sqlalchemy.exc import OperationalError

from hub.commands.common import CliError, common_flags, open_db, settings
from hub.db.session import head_revision, upgrade


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-db",
        help="create or upgrade the database schema",
        description="Run the Alembic migrations up to the newest revision. Safe to repeat: "
        "existing tables and data are kept.",
    )
    common_flags(p)
    p.set_defaults(handler=cmd_init_db)


def cmd_init_db(args: argparse.Namespace) -> int:
    db = open_db(settings(args), check=False)
    try:
        revision = upgrade(db)
    except OperationalError as exc:
        raise CliError(
            f"cannot migrate {db.display_url}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None
    finally:
        db.dispose()
    print(f"database {db.display_url} is at revision {revision} (newest: {head_revision()})")
    return 0
