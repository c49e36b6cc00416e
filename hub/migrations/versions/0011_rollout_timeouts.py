"""Rollouts that wait their turn (queued), wave timeouts, devices left behind offline, and a bound on
the anomaly rate's rise.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the model types: a revision must not change when the models do
ROLLOUT_STATES = "state IN ('draft', 'canary', 'rolling', 'paused', 'completed', 'rolled_back', 'failed')"
ROLLOUT_STATES_NOW = (
    "state IN ('draft', 'queued', 'canary', 'rolling', 'paused', 'completed', 'rolled_back', 'failed')"
)
TARGET_STATES = (
    "state IN ('pending', 'desired', 'downloading', 'verifying', 'building', 'testing', 'active', "
    "'failed', 'rolled_back')"
)
TARGET_STATES_NOW = (
    "state IN ('pending', 'desired', 'downloading', 'verifying', 'building', 'testing', 'active', "
    "'failed', 'rolled_back', 'timed_out', 'offline')"
)


def _states(table: str, check: str) -> None:
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(op.f(f"ck_{table}_state"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_state"), sa.text(check))


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("max_anomaly_rise", sa.Double(), nullable=True))
        batch.add_column(sa.Column("wave_timeout_s", sa.Double(), nullable=False, server_default="1800"))
    with op.batch_alter_table("rollouts") as batch:  # the default was for existing rows only
        batch.alter_column("wave_timeout_s", server_default=None)
    _states("rollouts", ROLLOUT_STATES_NOW)
    _states("rollout_targets", TARGET_STATES_NOW)


def downgrade() -> None:
    op.execute("UPDATE rollout_targets SET state = 'failed' WHERE state IN ('timed_out', 'offline')")
    op.execute("UPDATE rollouts SET state = 'rolled_back' WHERE state = 'queued'")
    _states("rollout_targets", TARGET_STATES)
    _states("rollouts", ROLLOUT_STATES)
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("wave_timeout_s")
        batch.drop_column("max_anomaly_rise")
