"""PostgreSQL's `results` by month: rows land in their capture month (or the default partition),
retention drops whole old months, keeps a month with a reviewed result, and creates the months ahead."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from hub.db import partitions
from hub.db.session import Database, upgrade
from hub.services.writes import BatchWriter, Envelope
from hub.services import retention, reviews
from hub.store import ImageStore
from shared import messages
from shared.ids import new_ulid

DAY = 86400.0


@pytest.fixture
def pg(fresh_db_url: str) -> Iterator[Database]:
    if not fresh_db_url.startswith("postgresql"):
        pytest.skip("partitions are PostgreSQL's; SQLite keeps one table")
    db = Database(fresh_db_url)
    upgrade(db)
    yield db
    db.dispose()


def _made(make_result, days: float, seed: int) -> messages.Result:
    """A result captured `days` ago, its id made then (as the agent makes it)."""
    ts = time.time() - days * DAY
    return make_result("plant", "cam", seed=seed, crops=1, ts=ts, id=new_ulid(int(ts * 1000)))


def _where(db: Database, ids: list[str]) -> dict[str, str]:
    with db.engine.connect() as c:
        rows = c.execute(text("SELECT id, tableoid::regclass::text FROM results WHERE id = ANY(:ids)"), {"ids": ids})
        return dict(rows.all())


def test_old_months_are_dropped_whole_and_a_reviewed_one_is_kept(pg: Database, tmp_path: Path, make_result) -> None:
    now = datetime.now(UTC)
    made = {"gone": _made(make_result, 500, 1), "gone2": _made(make_result, 500, 2),
            "kept": _made(make_result, 430, 3), "beside_kept": _made(make_result, 430, 4),
            "fresh": _made(make_result, 0, 5), "future": _made(make_result, -20 * 365, 6)}
    with pg.engine.begin() as c:  # the months of the old rows (the migration made them for rows it found)
        partitions.ensure(c, now, since=partitions.Month.of(now - timedelta(days=520)))
    BatchWriter(pg, ImageStore(tmp_path / "images")).write(
        [Envelope("plant", "cam", r, now) for r in made.values()])
    where = _where(pg, [r.id for r in made.values()])
    month = partitions.Month.of(datetime.fromtimestamp(made["gone"].ts, UTC))
    assert where[made["gone"].id] == where[made["gone2"].id] == month.name
    assert where[made["fresh"].id] == partitions.Month.of(now).name
    assert where[made["future"].id] == partitions.DEFAULT, "a clock far off still stores its results"
    with pg.transaction() as session:
        reviews.add_review(session, made["kept"].id, "defect", "real crack", user_id=None)

    report = retention.prune(pg, ImageStore(tmp_path / "images"), retention.Policy(results_days=365, images_days=30))
    assert report.results == 3 and report.kept_reviewed == 1
    with pg.engine.connect() as c:
        names = set(c.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                   "WHERE i.inhparent = 'results'::regclass")).scalars())
        left = set(c.execute(text("SELECT id FROM results")).scalars())
        crops = c.execute(text("SELECT count(*) FROM crops WHERE result_id = ANY(:ids)"),
                          {"ids": [made[n].id for n in ("gone", "gone2", "beside_kept")]}).scalar()
    assert month.name not in names, "the old month was not dropped"
    kept_month = partitions.Month.of(datetime.fromtimestamp(made["kept"].ts, UTC))
    assert kept_month.name in names, "a month with a reviewed result was dropped"
    assert left == {made[n].id for n in ("kept", "fresh", "future")} and crops == 0
    ahead = partitions.Month.of(now)
    for _ in range(partitions.MONTHS_AHEAD):
        ahead = ahead.next()
    assert ahead.name in names, "the months ahead are not there"


def test_the_results_list_reads_the_newest_month_by_index(pg: Database, tmp_path: Path, make_result) -> None:
    """The newest-first page of a device: each month's index read backwards and merged, no sort."""
    with pg.engine.begin() as c:
        c.execute(text("SET LOCAL enable_seqscan = off"))  # tiny tables: ask what the plan would be at size
        plan = "\n".join(c.execute(text("EXPLAIN SELECT id FROM results WHERE device_id = 1 "
                                         "ORDER BY id DESC LIMIT 50")).scalars())
    assert "Seq Scan" not in plan and "Index Only Scan Backward using results_y" in plan, plan
    # merged in id order from each month's index (Merge Append), never a sort of their rows
    assert re.search(r"\bSort\s+\(cost", plan) is None, f"the rows are sorted instead of read in order:\n{plan}"
