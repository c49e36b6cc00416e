"""An index to fold repeated frames newest first: anomalies by their thumbnail's sha256, then id.

With 0012's (thumbnail_sha, score, id) it lets the gallery and the review queue
find a frame's first result in either order, and its oldest and newest, in one
index probe each, however often the frame was seen (a looping camera, a demo
source). On PostgreSQL it also carries the columns the pages filter on (device,
station, class, capture time), so counting a frame's repeats under a filter
reads the index alone. On a partitioned `results` the index is made on every month.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANOMALY = sa.text("verdict = 'anomaly'")
NAME = "ix_results_anomaly_thumbnail_id"
INCLUDED = ("device_id", "station_id", "class_id", "ts")  # hub.db.models.Result has the same


def upgrade() -> None:
    op.create_index(NAME, "results", ["thumbnail_sha", "id"], postgresql_where=ANOMALY, sqlite_where=ANOMALY,
                    postgresql_include=list(INCLUDED))


def downgrade() -> None:
    op.drop_index(NAME, table_name="results")
