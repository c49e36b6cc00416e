"""Stations and classes as rows, device credentials, API tokens, the model registry and rollouts.

Results and devices named their station (and results their class) by string;
they now refer to `stations` and `classes` rows, filled from the strings
already stored, so no result loses its station or class.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the model types: a revision must not change when the models do
TS = sa.DateTime(timezone=True)
NAME = sa.String(length=64)
TEXT = sa.String(length=256)
ULID = sa.String(length=26)
SHA = sa.String(length=64)
ROLES = "role IN ('viewer', 'operator', 'admin')"
STATES = "state IN ('draft', 'canary', 'rolling', 'paused', 'completed', 'rolled_back', 'failed')"


def upgrade() -> None:
    op.create_table(
        "stations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_stations_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stations")),
        sa.UniqueConstraint("site_id", "name", name=op.f("uq_stations_site_id_name")),
    )
    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("reference_start", TS, nullable=True),
        sa.Column("reference_end", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_classes")),
        sa.UniqueConstraint("name", name=op.f("uq_classes_name")),
    )
    # every station and class the stored results and devices name
    op.execute(
        "INSERT INTO stations (site_id, name, created_at) "
        "SELECT site_id, station, CURRENT_TIMESTAMP FROM ("
        " SELECT d.site_id AS site_id, r.station AS station FROM results r"
        " JOIN devices d ON d.id = r.device_id"
        " UNION SELECT site_id, station FROM devices WHERE station <> ''"
        ") AS named"
    )
    op.execute(
        "INSERT INTO classes (name, created_at) "
        "SELECT DISTINCT cls, CURRENT_TIMESTAMP FROM results"
    )

    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("station_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("class_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE results SET "
        "station_id = (SELECT s.id FROM stations s JOIN devices d ON d.site_id = s.site_id"
        " WHERE d.id = results.device_id AND s.name = results.station), "
        "class_id = (SELECT c.id FROM classes c WHERE c.name = results.cls)"
    )
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_station_id")
        batch.alter_column("station_id", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("class_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(
            op.f("fk_results_station_id_stations"), "stations", ["station_id"], ["id"]
        )
        batch.create_foreign_key(
            op.f("fk_results_class_id_classes"), "classes", ["class_id"], ["id"]
        )
        batch.drop_column("station")
        batch.drop_column("cls")
        batch.create_index(op.f("ix_results_station_id_id"), ["station_id", "id"])

    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("station_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("mqtt_username", TEXT, nullable=True))
        batch.add_column(sa.Column("mqtt_password_hash", TEXT, nullable=True))
        batch.add_column(sa.Column("provisioned_at", TS, nullable=True))
    op.execute(
        "UPDATE devices SET station_id = (SELECT s.id FROM stations s"
        " WHERE s.site_id = devices.site_id AND s.name = devices.station) WHERE station <> ''"
    )
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("station")
        batch.create_foreign_key(
            op.f("fk_devices_station_id_stations"), "stations", ["station_id"], ["id"]
        )
        batch.create_unique_constraint(op.f("uq_devices_mqtt_username"), ["mqtt_username"])

    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("last_login_at", TS, nullable=True))

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("token_hash", SHA, nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.CheckConstraint(ROLES, name=op.f("ck_api_tokens_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("version", TEXT, nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("classes", sa.Text(), nullable=False),
        sa.Column("precision", sa.String(length=16), nullable=False),
        sa.Column("sha256", SHA, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_models_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_models_name_version")),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", ULID, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("canary_devices", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(STATES, name=op.f("ck_rollouts_state")),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_rollouts_model_id_models")
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_rollouts_site_id_sites")),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_rollouts_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_model_id"), "rollouts", ["model_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rollouts_model_id"), table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_table("models")
    op.drop_table("api_tokens")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("last_login_at")
        batch.drop_column("session_epoch")

    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint(op.f("uq_devices_mqtt_username"), type_="unique")
        batch.drop_constraint(op.f("fk_devices_station_id_stations"), type_="foreignkey")
        batch.add_column(sa.Column("station", TEXT, nullable=False, server_default=""))
    op.execute(
        "UPDATE devices SET station = (SELECT s.name FROM stations s"
        " WHERE s.id = devices.station_id) WHERE station_id IS NOT NULL"
    )
    with op.batch_alter_table("devices") as batch:
        batch.alter_column("station", existing_type=TEXT, server_default=None)
        for column in ("provisioned_at", "mqtt_password_hash", "mqtt_username", "station_id"):
            batch.drop_column(column)

    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("station", TEXT, nullable=False, server_default=""))
        batch.add_column(sa.Column("cls", TEXT, nullable=False, server_default=""))
    op.execute(
        "UPDATE results SET "
        "station = (SELECT s.name FROM stations s WHERE s.id = results.station_id), "
        "cls = (SELECT c.name FROM classes c WHERE c.id = results.class_id)"
    )
    with op.batch_alter_table("results") as batch:
        batch.drop_index(op.f("ix_results_station_id_id"))
        batch.drop_constraint(op.f("fk_results_station_id_stations"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_results_class_id_classes"), type_="foreignkey")
        batch.alter_column("station", existing_type=TEXT, server_default=None)
        batch.alter_column("cls", existing_type=TEXT, server_default=None)
        batch.drop_column("class_id")
        batch.drop_column("station_id")
        batch.create_index("ix_results_station_id", ["station", "id"])
    op.drop_table("classes")
    op.drop_table("stations")
