"""PostgreSQL only: `results` partitioned by month, by id (migration 0014).

A result's id is the agent's ULID, whose first ten digits are the capture time
in milliseconds, so a range of ids is a range of capture times: the month
``results_y2026m12`` holds the ids from the first ULID of 1 December 2026 up
to the first of 1 January 2027. Partitioning by id keeps the id the primary
key (re-sent results still meet ON CONFLICT DO NOTHING, crops and reviews
still reference it) and lets the dashboard's newest-first pages read the
newest month first. Ids outside every month (a device clock far off) go to
``results_default``; nothing is refused.

Months are created ahead (MONTHS_AHEAD) by the migration and by the leading
hub process; a month is not created while the default partition holds rows of
it (they stay there, found all the same, only not pruned by month).
Retention drops a month once all of it is past `results_days`, unless a
person reviewed one of its results: then its rows are deleted one by one as
before, and the reviewed ones stay.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text

from shared.ids import ulid_floor, ulid_time_ms

log = logging.getLogger(__name__)

MONTHS_AHEAD = 12  # months created beyond the current one
MONTHS_BEHIND = 24  # at most this many past months created for existing rows (older ones: the default)
DEFAULT = "results_default"
_NAME = re.compile(r"^results_y(\d{4})m(\d{2})$")
LOCK_TIMEOUT = "5s"  # detaching waits at most this long for the dashboard's and ingest's queries


@dataclass(frozen=True, slots=True)
class Month:
    year: int
    month: int

    @classmethod
    def of(cls, when: datetime) -> Month:
        return cls(when.year, when.month)

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def name(self) -> str:
        return f"results_y{self.year:04d}m{self.month:02d}"

    @property
    def low(self) -> str:
        """The first id of the month."""
        return ulid_floor(int(self.start().timestamp() * 1000))

    @property
    def high(self) -> str:
        """The first id of the next month (exclusive bound)."""
        return self.next().low


def is_partition(table: str) -> bool:
    """True for the name of one of `results`'s partitions (a month, or the default)."""
    return table == DEFAULT or _NAME.match(table) is not None


def is_partitioned(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(text("SELECT relkind FROM pg_class WHERE oid = to_regclass('results')")).scalar()
    return kind == "p"


def months(conn: Connection) -> list[Month]:
    """The month partitions that exist, oldest first."""
    names = conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('results')")).scalars()
    found = [Month(int(m.group(1)), int(m.group(2))) for n in names if (m := _NAME.match(n))]
    return sorted(found, key=lambda m: (m.year, m.month))


def ensure(conn: Connection, now: datetime, *, since: Month | None = None, default_exists: bool = True) -> list[str]:
    """Create the missing months from `since` (default: this one) to MONTHS_AHEAD beyond `now`'s;
    returns the names created. Run it in a transaction of its own."""
    have = set(months(conn))
    month, last = since or Month.of(now), Month.of(now)
    for _ in range(MONTHS_AHEAD):
        last = last.next()
    created = []
    while (month.year, month.month) <= (last.year, last.month):
        if month not in have:
            stray = default_exists and conn.execute(
                text(f"SELECT 1 FROM {DEFAULT} WHERE id >= :lo AND id < :hi LIMIT 1"),
                {"lo": month.low, "hi": month.high}).first()
            if stray:
                log.warning("results of %s are in %s (a device clock off?): the month is not made a "
                            "partition of its own", month.name, DEFAULT)
            else:
                conn.execute(text(f"CREATE TABLE IF NOT EXISTS {month.name} PARTITION OF results "
                                  f"FOR VALUES FROM ('{month.low}') TO ('{month.high}')"))
                created.append(month.name)
        month = month.next()
    if created:
        log.info("created the results partitions %s", ", ".join(created))
    return created


def first_month_of_rows(conn: Connection, table: str, now: datetime) -> Month:
    """The month of the oldest id in `table`, but no more than MONTHS_BEHIND back (now's month if empty)."""
    oldest = conn.execute(text(f"SELECT min(id) FROM {table}")).scalar()
    floor = Month.of(now)
    for _ in range(MONTHS_BEHIND):
        floor = Month(floor.year - (floor.month == 1), 12 if floor.month == 1 else floor.month - 1)
    if oldest is None:
        return Month.of(now)
    try:
        first = Month.of(datetime.fromtimestamp(ulid_time_ms(oldest) / 1000, UTC))
    except (ValueError, OverflowError):
        return floor
    return max(first, floor, key=lambda m: (m.year, m.month))


@dataclass(frozen=True, slots=True)
class Dropped:
    name: str
    results: int
    crops: int


def drop_before(conn: Connection, cutoff: datetime) -> Dropped | None:
    """Drop the oldest month wholly captured before `cutoff` and holding no reviewed result, with its
    crops; None when there is none. One month per call, each call its own transaction (the caller's)."""
    bound = ulid_floor(int(cutoff.timestamp() * 1000))
    for month in months(conn):
        if month.high > bound:
            return None
        reviewed = conn.execute(text("SELECT 1 FROM reviews WHERE result_id >= :lo AND result_id < :hi LIMIT 1"),
                                {"lo": month.low, "hi": month.high}).first()
        if reviewed:
            continue  # deleted row by row by the caller; the reviewed ones stay
        conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        results = conn.execute(text(f"SELECT count(*) FROM {month.name}")).scalar_one()
        crops = conn.execute(text("DELETE FROM crops WHERE result_id >= :lo AND result_id < :hi"),
                             {"lo": month.low, "hi": month.high}).rowcount
        conn.execute(text(f"ALTER TABLE results DETACH PARTITION {month.name}"))
        conn.execute(text(f"DROP TABLE {month.name}"))
        log.info("retention dropped the partition %s (%d results, %d crops)", month.name, results, crops)
        return Dropped(month.name, results, crops)
    return None
