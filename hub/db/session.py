"""Engine and session life cycle, in one place, and schema migrations.

SQLite (the default) runs in WAL mode with a busy timeout, so the ingest
writer and the web readers work side by side; PostgreSQL is chosen by URL
(``postgresql+psycopg://user@host/db``). The schema is created and upgraded
only by Alembic (`upgrade`); `check_schema` refuses to run against a database
that is behind the code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = (
    10_000  # a writer's transaction is short; waiting beats "database is locked"
)


class SchemaError(RuntimeError):
    """The database schema is missing or not at the revision this code expects."""


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` as the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite files get their directory created and WAL mode switched on."""
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"database URL {url!r} is not valid; use sqlite:///path/hub.db "
            "or postgresql+psycopg://user@host/dbname"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(parsed, pool_pre_ping=True, **kwargs)
    event.listen(engine, "connect", _postgresql_settings)
    return engine


def _postgresql_settings(dbapi_connection: Any, _record: Any) -> None:
    """JIT off: the hub's queries are short index walks, and a plan that counts a frame's repeats
    in subqueries looks costly enough to compile (1.6 s of LLVM for a 70 ms query, measured)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SET jit = off")
    cursor.close()
    dbapi_connection.commit()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory ones)."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


class Database:
    """One engine and its session factory; share one per process."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def session(self) -> Session:
        """A new session; the caller closes it (or use `transaction`)."""
        return self.sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error, closed."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        """The URL with any password masked, for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(db: Database, revision: str = "head") -> str:
    """Migrate the schema up to `revision` (never drops data); returns the revision reached."""
    from alembic import command

    with db.engine.connect() as connection:
        sqlite = db.dialect == "sqlite"
        if sqlite:
            # SQLite rebuilds altered tables (copy, drop, rename): foreign keys must not fire
            # mid-way. The pragma only works outside a transaction; checked again at the end.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                command.upgrade(_alembic_config(connection), revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise SchemaError(
                            f"migrating {db.display_url} would break {len(broken)} foreign keys "
                            f"(first: {tuple(broken[0])}); nothing was changed"
                        )
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    current = current_revision(db)
    log.info("database %s is at revision %s", db.display_url, current)
    return current or ""


def current_revision(db: Database) -> str | None:
    """The schema revision stored in the database, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision this code ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None, "hub/migrations has no revisions"
    return head


def check_schema(db: Database) -> None:
    """Raise SchemaError unless the database is at the newest revision."""
    current, head = current_revision(db), head_revision()
    if current != head:
        state = "has no kdfleet schema" if current is None else f"is at revision {current}"
        raise SchemaError(
            f"database {db.display_url} {state}, this hub needs {head}: "
            f"run `kdfleet hub init-db --db URL` (or --config FILE) first"
        )
