"""An index to fold repeated frames: anomalies by their thumbnail's sha256 (then score and id).

The gallery and the review queue show a frame seen again and again (a replayed
folder, a part that sits in front of the camera) once, with a count: each row
looks for a better row of the same image, which this index answers at once.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANOMALY = sa.text("verdict = 'anomaly'")
NAME = "ix_results_anomaly_thumbnail_score_id"


def upgrade() -> None:
    op.create_index(NAME, "results", ["thumbnail_sha", "score", "id"], postgresql_where=ANOMALY,
                    sqlite_where=ANOMALY)


def downgrade() -> None:
    op.drop_index(NAME, table_name="results")
