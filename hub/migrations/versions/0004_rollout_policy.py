"""Rollout policies (waves, soak, failure and health bounds) and per-device rollout targets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the model types: a revision must not change when the models do
TS = sa.DateTime(timezone=True)
TEXT = sa.String(length=256)
ULID = sa.String(length=26)
TARGET_STATES = (
    "state IN ('pending', 'desired', 'downloading', 'verifying', 'building', 'testing', 'active', "
    "'failed', 'rolled_back')"
)


def _policy_columns() -> tuple[sa.Column, ...]:
    return (
        sa.Column("wave_size", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("soak_s", sa.Double(), nullable=False, server_default="60"),
        sa.Column("max_failures", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("max_anomaly_rate", sa.Double(), nullable=True),
        sa.Column("max_latency_ms", sa.Double(), nullable=True),
        sa.Column("paused_from", sa.String(length=16), nullable=True),
    )


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        for column in _policy_columns():
            batch.add_column(column)
    with op.batch_alter_table("rollouts") as batch:  # the defaults were for existing rows only
        for name in ("wave_size", "soak_s", "max_failures"):
            batch.alter_column(name, server_default=None)
    op.create_table(
        "rollout_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", ULID, nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("previous_model", TEXT, nullable=False),
        sa.Column("previous_version", TEXT, nullable=False),
        sa.Column("sent_version", TEXT, nullable=False),
        sa.Column("desired_at", TS, nullable=True),
        sa.Column("active_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(TARGET_STATES, name=op.f("ck_rollout_targets_state")),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_rollout_targets_device_id_devices")),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_targets_rollout_id_rollouts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_targets")),
        sa.UniqueConstraint("rollout_id", "device_id", name=op.f("uq_rollout_targets_rollout_id_device_id")),
    )
    op.create_index(op.f("ix_rollout_targets_rollout_id"), "rollout_targets", ["rollout_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rollout_targets_rollout_id"), table_name="rollout_targets")
    op.drop_table("rollout_targets")
    with op.batch_alter_table("rollouts") as batch:
        for column in _policy_columns():
            batch.drop_column(column.name)
