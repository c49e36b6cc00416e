"""Indexes the dashboard needs at a million results and more.

`results.class_id`: the class filter; `results.received_at`: the live feed's
cursor; anomalies only (partial indexes, so the many rows judged ok cost them
nothing at insert time): newest first (the verdict filter, the review queue),
and highest score first (the defect gallery), replacing 0001's index on
(verdict, id) over every row; `reviews(label, id)`: the trainer's listing of
false alarms.

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANOMALY = sa.text("verdict = 'anomaly'")
INDEXES = (
    ("ix_results_class_id_id", "results", ["class_id", "id"]),
    ("ix_results_received_at", "results", ["received_at"]),
    ("ix_reviews_label_id", "reviews", ["label", "id"]),
)
PARTIAL = (
    ("ix_results_anomaly_id", ["id"]),
    ("ix_results_anomaly_score_id", ["score", "id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(op.f(name), table, columns)
    for name, columns in PARTIAL:
        op.create_index(
            op.f(name), "results", columns, postgresql_where=ANOMALY, sqlite_where=ANOMALY
        )
    op.drop_index(op.f("ix_results_verdict_id"), table_name="results")


def downgrade() -> None:
    op.create_index(op.f("ix_results_verdict_id"), "results", ["verdict", "id"])
    for name, _ in reversed(PARTIAL):
        op.drop_index(op.f(name), table_name="results")
    for name, table, _ in reversed(INDEXES):
        op.drop_index(op.f(name), table_name=table)
