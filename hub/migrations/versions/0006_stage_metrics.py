"""Per-stage latency (inference, scoring) and GPU load as devices report them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("infer_p95_ms", "score_p95_ms", "gpu_percent")


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
