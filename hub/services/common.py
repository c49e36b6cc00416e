"""What the service modules share: the error type, time and id parsing, dialect helpers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Insert, cast, func
from sqlalchemy import Integer as SqlInteger
from sqlalchemy.orm import Session

from shared.ids import is_ulid

MAX_PAGE = 500
DEFAULT_PAGE = 50


class QueryError(ValueError):
    """A value the hub cannot use (a filter, a form field); the message says which and why."""


class NotFound(LookupError):
    """The thing asked for does not exist; the message names it."""


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 time (a time without zone is read as UTC); raises QueryError."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise QueryError(
            f"{name} must be an ISO 8601 time like 2025-01-31T08:00:00Z, not {value!r}"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_limit(value: str | None, default: int = DEFAULT_PAGE, maximum: int = MAX_PAGE) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise QueryError(f"limit must be a whole number from 1 to {maximum}, not {value!r}")
    return int(value)


def check_ulid(value: str, name: str) -> str:
    """`value` if it is a ULID, the only kind of id results have; raises QueryError."""
    if not is_ulid(value):
        raise QueryError(f"{name} must be a result id (26-character ULID), not {value[:64]!r}")
    return value


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_floor(when: datetime) -> str:
    """The smallest ULID made at `when`: ULIDs compare like their creation times."""
    ms = max(0, int(when.timestamp() * 1000))
    digits = []
    for _ in range(10):
        ms, r = divmod(ms, 32)
        digits.append(_CROCKFORD[r])
    return "".join(reversed(digits)) + "0" * 16


def epoch_seconds(session: Session, column: ColumnElement[datetime]) -> ColumnElement[int]:
    """A UTC datetime column as whole unix seconds, in the session's SQL dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), SqlInteger)
    return cast(func.strftime("%s", column), SqlInteger)  # SQLite keeps naive UTC text


def insert_ignoring_duplicates(session: Session, model: type) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING for the session's dialect (SQLite or PostgreSQL)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise RuntimeError(
            f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL"
        )
    return insert(model).on_conflict_do_nothing()


def now_utc() -> datetime:
    return datetime.now(UTC)


WINDOWS = {  # the time windows the charts and the live feed offer
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "8h": timedelta(hours=8),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
