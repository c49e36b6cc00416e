"""Model metrics and lineage in the registry: what a package measured, and what it was retrained from.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("parent_version", sa.String(length=256), nullable=False, server_default=""))
        batch.add_column(sa.Column("metrics", sa.Text(), nullable=False, server_default="{}"))
    with op.batch_alter_table("models") as batch:  # the defaults were for existing rows only
        batch.alter_column("parent_version", server_default=None)
        batch.alter_column("metrics", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("metrics")
        batch.drop_column("parent_version")
