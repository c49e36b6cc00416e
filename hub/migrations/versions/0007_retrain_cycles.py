"""Retraining cycles as the retraining service reports them, for the dashboard.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = sa.String(length=256)
OUTCOMES = "outcome IN ('waiting', 'refused', 'published', 'failed')"


def upgrade() -> None:
    op.create_table(
        "retrain_cycles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", TEXT, nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("new_images", sa.Integer(), nullable=False),
        sa.Column("version", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("rollout_id", sa.String(length=26), nullable=True),
        sa.Column("gate", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(OUTCOMES, name=op.f("ck_retrain_cycles_outcome")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_retrain_cycles_model_id_models"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_cycles")),
    )
    op.create_index(op.f("ix_retrain_cycles_created_at"), "retrain_cycles", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_retrain_cycles_created_at"), table_name="retrain_cycles")
    op.drop_table("retrain_cycles")
