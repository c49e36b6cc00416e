"""PostgreSQL: `results` partitioned by month of its id (the ULID's capture time); SQLite unchanged.

The table is rebuilt: the rows move into a partitioned table with the same
name, columns, keys and indexes (hub.db.partitions explains the layout), the
months of the rows there and MONTHS_AHEAD more, and a default partition for ids
outside them. Crops and reviews reference it as before.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from alembic import op

from hub.db import partitions

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = """
    id character varying(26) NOT NULL,
    device_id integer NOT NULL,
    ts timestamp with time zone NOT NULL,
    model_version character varying(256) NOT NULL,
    score double precision NOT NULL,
    norm_score double precision NOT NULL,
    threshold double precision NOT NULL,
    verdict character varying(16) NOT NULL,
    latency_ms double precision NOT NULL,
    heatmap_sha character varying(64),
    thumbnail_sha character varying(64),
    frame_sha character varying(64),
    source character varying(256) NOT NULL,
    received_at timestamp with time zone NOT NULL,
    station_id integer NOT NULL,
    class_id integer NOT NULL,
    CONSTRAINT pk_results PRIMARY KEY (id),
    CONSTRAINT ck_results_verdict CHECK (verdict::text = ANY (ARRAY['ok', 'anomaly']::text[])),
    CONSTRAINT fk_results_class_id_classes FOREIGN KEY (class_id) REFERENCES classes(id),
    CONSTRAINT fk_results_device_id_devices FOREIGN KEY (device_id) REFERENCES devices(id),
    CONSTRAINT fk_results_station_id_stations FOREIGN KEY (station_id) REFERENCES stations(id)
"""
INDEXES = {
    "ix_results_anomaly_id": "(id) WHERE verdict::text = 'anomaly'::text",
    "ix_results_anomaly_score_id": "(score, id) WHERE verdict::text = 'anomaly'::text",
    "ix_results_anomaly_thumbnail_score_id": "(thumbnail_sha, score, id) WHERE verdict::text = 'anomaly'::text",
    "ix_results_class_id_id": "(class_id, id)",
    "ix_results_device_id_id": "(device_id, id)",
    "ix_results_received_at": "(received_at)",
    "ix_results_station_id_id": "(station_id, id)",
    "ix_results_ts": "(ts)",
}
REFERENCES = {  # the tables that reference results, and their foreign keys' names
    "crops": "fk_crops_result_id_results",
    "reviews": "fk_reviews_result_id_results",
}


def _rebuild(partitioned: bool) -> None:
    """Move the rows into a new `results`, partitioned or not, with the same names for everything."""
    for table, fk in REFERENCES.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {fk}")
    op.execute("ALTER TABLE results RENAME TO results_moving")
    op.execute("ALTER TABLE results_moving DROP CONSTRAINT pk_results")
    for name in ("ck_results_verdict", "fk_results_class_id_classes", "fk_results_device_id_devices",
                 "fk_results_station_id_stations"):
        op.execute(f"ALTER TABLE results_moving DROP CONSTRAINT {name}")
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
    op.execute(f"CREATE TABLE results ({COLUMNS}){' PARTITION BY RANGE (id)' if partitioned else ''}")
    if partitioned:
        conn = op.get_bind()
        now = datetime.now(UTC)
        partitions.ensure(conn, now, since=partitions.first_month_of_rows(conn, "results_moving", now),
                          default_exists=False)
        op.execute(f"CREATE TABLE {partitions.DEFAULT} PARTITION OF results DEFAULT")
    op.execute("INSERT INTO results SELECT * FROM results_moving")
    op.execute("DROP TABLE results_moving")
    for name, definition in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON results {definition}")
    for table, fk in REFERENCES.items():
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {fk} FOREIGN KEY (result_id) REFERENCES results(id) "
                   "ON DELETE CASCADE")
    op.execute("ANALYZE results")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _rebuild(partitioned=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _rebuild(partitioned=False)
