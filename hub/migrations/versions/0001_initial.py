"""Initial schema: sites, devices, results, crops, users, reviews.

Revision ID: 0001
Revises:
Create Date: 2025-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the model types: a revision must not change when the models do
TS = sa.DateTime(timezone=True)
NAME = sa.String(length=64)
TEXT = sa.String(length=256)
ULID = sa.String(length=26)
SHA = sa.String(length=64)


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("name", name=op.f("uq_sites_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", NAME, nullable=False),
        sa.Column("password_hash", TEXT, nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("role IN ('viewer', 'operator', 'admin')", name=op.f("ck_users_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("station", TEXT, nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", TS, nullable=True),
        sa.Column("status_at", TS, nullable=True),
        sa.Column("agent_version", TEXT, nullable=False),
        sa.Column("model_id", TEXT, nullable=False),
        sa.Column("model_version", TEXT, nullable=False),
        sa.Column("runtime", TEXT, nullable=False),
        sa.Column("hardware", TEXT, nullable=False),
        sa.Column("metrics_at", TS, nullable=True),
        sa.Column("fps", sa.Double(), nullable=True),
        sa.Column("latency_p50_ms", sa.Double(), nullable=True),
        sa.Column("latency_p95_ms", sa.Double(), nullable=True),
        sa.Column("frames_dropped", sa.Integer(), nullable=True),
        sa.Column("results_dropped", sa.Integer(), nullable=True),
        sa.Column("spool_depth", sa.Integer(), nullable=True),
        sa.Column("cpu_percent", sa.Double(), nullable=True),
        sa.Column("temperature_c", sa.Double(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_devices_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("site_id", "name", name=op.f("uq_devices_site_id_name")),
    )
    op.create_table(
        "results",
        sa.Column("id", ULID, nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("station", TEXT, nullable=False),
        sa.Column("cls", TEXT, nullable=False),
        sa.Column("model_version", TEXT, nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("norm_score", sa.Double(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("heatmap_sha", SHA, nullable=True),
        sa.Column("thumbnail_sha", SHA, nullable=True),
        sa.Column("frame_sha", SHA, nullable=True),
        sa.Column("source", TEXT, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.CheckConstraint("verdict IN ('ok', 'anomaly')", name=op.f("ck_results_verdict")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_results_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
    )
    op.create_index(op.f("ix_results_device_id_id"), "results", ["device_id", "id"])
    op.create_index(op.f("ix_results_station_id"), "results", ["station", "id"])
    op.create_index(op.f("ix_results_ts"), "results", ["ts"])
    op.create_index(op.f("ix_results_verdict_id"), "results", ["verdict", "id"])
    op.create_table(
        "crops",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", ULID, nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("x", sa.Integer(), nullable=False),
        sa.Column("y", sa.Integer(), nullable=False),
        sa.Column("w", sa.Integer(), nullable=False),
        sa.Column("h", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("image_sha", SHA, nullable=True),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["results.id"],
            name=op.f("fk_crops_result_id_results"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crops")),
        sa.UniqueConstraint("result_id", "idx", name=op.f("uq_crops_result_id_idx")),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", ULID, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("label IN ('defect', 'false_alarm')", name=op.f("ck_reviews_label")),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["results.id"],
            name=op.f("fk_reviews_result_id_results"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_reviews_user_id_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index(op.f("ix_reviews_result_id"), "reviews", ["result_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_reviews_result_id"), table_name="reviews")
    op.drop_table("reviews")
    op.drop_table("crops")
    for name in (
        "ix_results_verdict_id",
        "ix_results_ts",
        "ix_results_station_id",
        "ix_results_device_id_id",
    ):
        op.drop_index(op.f(name), table_name="results")
    op.drop_table("results")
    op.drop_table("devices")
    op.drop_table("users")
    op.drop_table("sites")
