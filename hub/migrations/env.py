"""Alembic environment for the hub; run through `python -m hub init-db` (hub.db.session.upgrade).

The caller hands over an open connection in ``config.attributes["connection"]``;
``sqlalchemy.url`` is the fallback for running Alembic by hand.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from hub.db.models import Base
from hub.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    # batch mode lets later revisions ALTER tables on SQLite (copy-and-move)
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: use `python -m hub init-db --db URL`")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (SQL script) migrations are not supported; use `python -m hub init-db`"
    )
run_online()
