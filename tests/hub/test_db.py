"""Migrations bring SQLite and PostgreSQL to the schema the models describe, and keep data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from hub.db import partitions
from hub.db.models import Base, Device, ProductClass, Result, Site, Station
from hub.db.session import (
    Database,
    SchemaError,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
)

TABLES = {
    "sites",
    "devices",
    "stations",
    "classes",
    "results",
    "crops",
    "reviews",
    "users",
    "api_tokens",
    "models",
    "rollouts",
    "rollout_targets",
    "alembic_version",
}


def _not_a_partition(obj, name, type_, reflected, compare_to) -> bool:
    """PostgreSQL's partitions of `results` (and the foreign keys it makes to each) are not in the models."""
    if type_ == "table":
        return not partitions.is_partition(name)
    if type_ == "foreign_key_constraint":
        return not partitions.is_partition(obj.referred_table.name)
    return not partitions.is_partition(obj.table.name) if hasattr(obj, "table") else True


def test_upgrade_head_creates_the_schema_the_models_describe(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert upgrade(db) == head_revision()
        assert set(inspect(db.engine).get_table_names()) >= TABLES
        check_schema(db)
        with db.engine.connect() as connection:
            diff = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": True,
                                                             "include_object": _not_a_partition}), Base.metadata
            )
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        db.dispose()


def test_upgrade_is_repeatable_and_keeps_rows(db_url: str, unique: str) -> None:
    db = Database(db_url)
    try:
        upgrade(db)
        with db.transaction() as session:
            session.add(Device(site=Site(name=f"keep-{unique}"), name="d1"))
        assert upgrade(db) == head_revision()
        with db.session() as session:
            site = session.scalar(select(Site).where(Site.name == f"keep-{unique}"))
            assert site is not None
            assert site.created_at.tzinfo is not None
            assert abs((datetime.now(UTC) - site.created_at).total_seconds()) < 60
    finally:
        db.dispose()


def test_check_schema_names_the_fix_for_an_empty_database(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'empty.db'}")
    try:
        assert current_revision(db) is None
        with pytest.raises(SchemaError, match="init-db"):
            check_schema(db)
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose()


def test_upgrading_from_the_first_schema_keeps_every_result_with_its_station_and_class(
    fresh_db_url: str,
) -> None:
    """0002 turns the station and class strings of stored rows into rows of their own."""
    db = Database(fresh_db_url)
    try:
        upgrade(db, "0001")
        now = "CURRENT_TIMESTAMP"
        with db.engine.begin() as c:
            c.execute(text(f"INSERT INTO sites (name, created_at) VALUES ('p1', {now}), ('p2', {now})"))
            for site_id, device, station in ((1, "cam-1", "line-a"), (2, "cam-2", "")):
                c.execute(
                    text(
                        "INSERT INTO devices (site_id, name, station, online, agent_version, model_id,"
                        " model_version, runtime, hardware, created_at) VALUES"
                        f" (:site, :name, :station, true, '', '', '', '', '', {now})"
                    ),
                    {"site": site_id, "name": device, "station": station},
                )
            rows = [  # (id, device, station, class): line-a exists at both sites
                ("01J0000000000000000000000A", 1, "line-a", "bottle"),
                ("01J0000000000000000000000B", 1, "line-b", "screw"),
                ("01J0000000000000000000000C", 2, "line-a", "bottle"),
            ]
            for rid, device_id, station, cls in rows:
                c.execute(
                    text(
                        "INSERT INTO results (id, device_id, ts, station, cls, model_version, score,"
                        " norm_score, threshold, verdict, latency_ms, source, received_at) VALUES"
                        f" (:id, :device, {now}, :station, :cls, '1', 0.5, 1.0, 0.4, 'anomaly', 9,"
                        f" '', {now})"
                    ),
                    {"id": rid, "device": device_id, "station": station, "cls": cls},
                )
        assert upgrade(db) == head_revision()
        with db.session() as session:
            found = session.execute(
                select(Result.id, Site.name, Station.name, ProductClass.name)
                .join(Result.station)
                .join(Station.site)
                .join(Result.product_class)
                .order_by(Result.id)
            ).all()
            device = session.scalar(select(Device).where(Device.name == "cam-1"))
            assert device is not None and session.get(Station, device.station_id).name == "line-a"
            assert session.scalar(select(Device.station_id).where(Device.name == "cam-2")) is None
        assert [tuple(r) for r in found] == [
            ("01J0000000000000000000000A", "p1", "line-a", "bottle"),
            ("01J0000000000000000000000B", "p1", "line-b", "screw"),
            ("01J0000000000000000000000C", "p2", "line-a", "bottle"),
        ]
    finally:
        db.dispose()
