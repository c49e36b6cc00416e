"""The hub's tables as SQLAlchemy 2 typed declarative models.

Rows hold metadata only; images live in the content-addressed store and rows
refer to them by sha256. A result's primary key is the ULID the agent gave it,
so a result re-sent after an outage is recognised and stored once.
Stations and product classes are rows of their own that results refer to;
`models` and `rollouts` hold the model registry the OTA rollouts work from.
Schema changes go through Alembic (hub/migrations), never `create_all`.

The whole schema is one module on purpose: the tables refer to one another and
Alembic (hub/migrations/env.py) compares the migrations with all of their
metadata at once, so it is read as one.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from shared.vocabulary import MODEL_ACTIVE, MODEL_FAILED, MODEL_ROLLED_BACK, MODEL_UPDATING, REVIEW_LABELS, VERDICTS

NAME_LEN = 64  # site and device names (shared.topics.check_name)
TEXT_LEN = 256  # free text from the wire (shared.messages.MAX_TEXT)
ULID_LEN = 26
SHA_LEN = 64
URL_LEN = 2048
ADDRESS_LEN = 64  # an IPv6 address with its zone

ROLES = ("viewer", "operator", "admin")  # each role may do what the ones before it may
RETRAIN_OUTCOMES = ("waiting", "refused", "published", "failed")  # a `kdfleet trainer serve` cycle

# a rollout (hub.services.rollouts): queued while its devices are busy in another, then canary and rolling
# waves, which a pause interrupts, until it completes, fails or is rolled back by hand
ROLLOUT_DRAFT = "draft"
ROLLOUT_QUEUED = "queued"
ROLLOUT_CANARY = "canary"
ROLLOUT_ROLLING = "rolling"
ROLLOUT_PAUSED = "paused"
ROLLOUT_COMPLETED = "completed"
ROLLOUT_ROLLED_BACK = "rolled_back"
ROLLOUT_FAILED = "failed"
ROLLOUT_STATES = (ROLLOUT_DRAFT, ROLLOUT_QUEUED, ROLLOUT_CANARY, ROLLOUT_ROLLING, ROLLOUT_PAUSED, ROLLOUT_COMPLETED,
                  ROLLOUT_ROLLED_BACK, ROLLOUT_FAILED)

# one device in a rollout: waiting for its wave, told (desired), then the agent's own update states
# (shared.vocabulary MODEL_*), or, when it did not finish in time, timed out (online) or left behind (offline)
TARGET_PENDING = "pending"
TARGET_DESIRED = "desired"
TARGET_TIMED_OUT = "timed_out"
TARGET_OFFLINE = "offline"
TARGET_STATES = (TARGET_PENDING, TARGET_DESIRED, *MODEL_UPDATING, MODEL_ACTIVE, MODEL_FAILED, MODEL_ROLLED_BACK,
                 TARGET_TIMED_OUT, TARGET_OFFLINE)


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_unix(ts: float) -> datetime:
    """A unix timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    PostgreSQL keeps `timestamptz`; SQLite has no time zones, so values are
    stored as naive UTC and given their zone back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give the hub aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # constraint names fixed by convention so migrations name them the same on every backend
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


def _in(column: str, choices: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(c) for c in choices)})"


# a partial index: rows judged ok (most of them) cost it nothing at insert time
_ANOMALY_ONLY = {
    "postgresql_where": text("verdict = 'anomaly'"),
    "sqlite_where": text("verdict = 'anomaly'"),
}


class Site(Base):
    """A factory site: the `{site}` level of the topic tree."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    devices: Mapped[list[Device]] = relationship(back_populates="site", lazy="raise")


class Station(Base):
    """An inspection point on a site's line; results and devices name it."""

    __tablename__ = "stations"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(TEXT_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    site: Mapped[Site] = relationship(lazy="raise")


class ProductClass(Base):
    """A product class a model inspects (``cls`` on the wire), with its drift reference window."""

    __tablename__ = "classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(TEXT_LEN), unique=True)
    # scores captured in this window are the reference the drift chart compares against;
    # NULL: the period of equal length just before the window shown
    reference_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reference_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Device(Base):
    """An edge device, kept current from its status (birth / last will) and metrics messages."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    station_id: Mapped[int | None] = mapped_column(ForeignKey("stations.id"))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)  # hub clock, last message heard
    # from the status message
    status_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # device clock
    agent_version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    model_id: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    model_version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    runtime: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    hardware: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    # from the latest metrics message; NULL until the first one arrives
    metrics_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # device clock
    fps: Mapped[float | None] = mapped_column(Double)
    latency_p50_ms: Mapped[float | None] = mapped_column(Double)
    latency_p95_ms: Mapped[float | None] = mapped_column(Double)
    frames_dropped: Mapped[int | None] = mapped_column(Integer)
    results_dropped: Mapped[int | None] = mapped_column(Integer)
    spool_depth: Mapped[int | None] = mapped_column(Integer)
    pending_receipts: Mapped[int | None] = mapped_column(Integer)  # sent, awaiting the hub's receipt
    cpu_percent: Mapped[float | None] = mapped_column(Double)
    temperature_c: Mapped[float | None] = mapped_column(Double)
    infer_p95_ms: Mapped[float | None] = mapped_column(Double)  # per stage: inference, per frame
    score_p95_ms: Mapped[float | None] = mapped_column(Double)  # per stage: scoring, crops, heat map
    gpu_percent: Mapped[float | None] = mapped_column(Double)
    frames_rejected: Mapped[int | None] = mapped_column(Integer)  # frames its sources could not use
    source_error: Mapped[str | None] = mapped_column(String(TEXT_LEN))  # a failing source's error; "": none
    # MQTT credentials (`kdfleet hub add-device`); the hash is in Mosquitto's own format
    mqtt_username: Mapped[str | None] = mapped_column(String(TEXT_LEN), unique=True)
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(TEXT_LEN))
    provisioned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    site: Mapped[Site] = relationship(back_populates="devices", lazy="raise")
    station: Mapped[Station | None] = relationship(lazy="raise")


class Result(Base):
    """One inspected frame; `id` is the agent's ULID."""

    __tablename__ = "results"
    __table_args__ = (
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        Index(None, "device_id", "id"),
        Index(None, "station_id", "id"),
        Index(None, "class_id", "id"),
        Index(None, "ts"),
        Index(None, "received_at"),  # the live feed's cursor
        # anomalies only (a few percent of rows): the gallery, the review queue, the verdict filter
        Index("ix_results_anomaly_id", "id", **_ANOMALY_ONLY),
        Index("ix_results_anomaly_score_id", "score", "id", **_ANOMALY_ONLY),
        # repeats of one frame, folded into one card (hub.services.results.grouped_results)
        Index("ix_results_anomaly_thumbnail_score_id", "thumbnail_sha", "score", "id", **_ANOMALY_ONLY),
        Index("ix_results_anomaly_thumbnail_id", "thumbnail_sha", "id", **_ANOMALY_ONLY,
              postgresql_include=["device_id", "station_id", "class_id", "ts"]),  # counted from the index
    )

    id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime)  # capture time, device clock
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id"))
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"))
    model_version: Mapped[str] = mapped_column(String(TEXT_LEN))
    score: Mapped[float] = mapped_column(Double)
    norm_score: Mapped[float] = mapped_column(Double)
    threshold: Mapped[float] = mapped_column(Double)
    verdict: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[float] = mapped_column(Double)
    heatmap_sha: Mapped[str | None] = mapped_column(String(SHA_LEN))
    thumbnail_sha: Mapped[str | None] = mapped_column(String(SHA_LEN))
    frame_sha: Mapped[str | None] = mapped_column(String(SHA_LEN))
    source: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # hub clock

    device: Mapped[Device] = relationship(lazy="raise")
    station: Mapped[Station] = relationship(lazy="raise")
    product_class: Mapped[ProductClass] = relationship(lazy="raise")
    crops: Mapped[list[Crop]] = relationship(
        back_populates="result", lazy="raise", order_by="Crop.idx", passive_deletes=True
    )


class Crop(Base):
    """An anomalous region of a result: box in frame pixels, peak score, image in the store."""

    __tablename__ = "crops"
    __table_args__ = (UniqueConstraint("result_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)  # position in the result's crop list
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    w: Mapped[int] = mapped_column(Integer)
    h: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Double)
    image_sha: Mapped[str | None] = mapped_column(String(SHA_LEN))

    result: Mapped[Result] = relationship(back_populates="crops", lazy="raise")


class User(Base):
    """A dashboard user; the password is stored as a salted hash only."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    password_hash: Mapped[str] = mapped_column(String(TEXT_LEN))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # bumped when the password, role or active flag changes: older sessions stop working
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Lease(Base):
    """Work only one hub process of several may do at a time (rollouts, retention): who holds it until
    when. Held by renewing it; a process that dies loses it once `expires_at` passes (hub.leader)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(TEXT_LEN))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LoginFailure(Base):
    """A failed sign-in, kept while the sign-in throttle counts it (hub/services/users.py).

    In the database rather than in one process, so the throttle holds whichever
    of the hub's web processes a browser reaches.
    """

    __tablename__ = "login_failures"
    __table_args__ = (Index(None, "username", "at"), Index(None, "address", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(NAME_LEN))  # as typed (cut), whether such a user exists or not
    address: Mapped[str] = mapped_column(String(ADDRESS_LEN))  # the client's IP address
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ApiToken(Base):
    """A service's bearer token for the JSON API; only its sha256 is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    token_hash: Mapped[str] = mapped_column(String(SHA_LEN), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the token's first characters, to recognise it
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Review(Base):
    """A person's judgement of a result (confirmed defect or false alarm); feeds retraining."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint(_in("label", REVIEW_LABELS), name="label"),
        Index(None, "label", "id"),  # training data: the false alarms, newest first
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    label: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    result: Mapped[Result] = relationship(lazy="raise")
    user: Mapped[User | None] = relationship(lazy="raise")


class Model(Base):
    """A model package in the registry: what a rollout ships to devices."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(TEXT_LEN))  # the package's model id, as devices report it
    version: Mapped[str] = mapped_column(String(TEXT_LEN))
    method: Mapped[str] = mapped_column(String(32), default="")  # shared.vocabulary.METHODS
    classes: Mapped[str] = mapped_column(Text, default="")  # product classes it scores, comma-separated
    precision: Mapped[str] = mapped_column(String(16), default="")  # fp32 | fp16 | int8
    sha256: Mapped[str] = mapped_column(String(SHA_LEN))  # of the .kdpkg file
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    url: Mapped[str] = mapped_column(String(URL_LEN))  # where devices download the package
    notes: Mapped[str] = mapped_column(Text, default="")
    parent_version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")  # lineage: retrained from
    metrics: Mapped[str] = mapped_column(Text, default="{}")  # JSON summary of the manifest's metrics
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Rollout(Base):
    """Shipping one model to a site (or every site): canary devices first, then the rest."""

    __tablename__ = "rollouts"
    __table_args__ = (CheckConstraint(_in("state", ROLLOUT_STATES), name="state"),)

    id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)  # the wire's rollout_id
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"))  # NULL: every site
    state: Mapped[str] = mapped_column(String(16), default=ROLLOUT_DRAFT)
    canary_devices: Mapped[int] = mapped_column(Integer, default=1)  # devices updated first
    note: Mapped[str] = mapped_column(Text, default="")  # why it was started, paused or rolled back
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # the policy: canary first, then waves, each gated on health for `soak_s`
    wave_size: Mapped[int] = mapped_column(Integer, default=0)  # devices per wave after the canary; 0: all
    soak_s: Mapped[float] = mapped_column(Double, default=60.0)  # healthy time a wave needs before the next
    max_failures: Mapped[int] = mapped_column(Integer, default=1)  # failed devices that abort the rollout
    max_anomaly_rate: Mapped[float | None] = mapped_column(Double)  # health gate; NULL: not checked
    max_latency_ms: Mapped[float | None] = mapped_column(Double)  # health gate on p95; NULL: not checked
    max_anomaly_rise: Mapped[float | None] = mapped_column(Double)  # gate on the rate's rise; NULL: not checked
    wave_timeout_s: Mapped[float] = mapped_column(Double, default=1800.0)  # a told device must finish by then
    paused_from: Mapped[str | None] = mapped_column(String(16))  # the state a pause interrupted

    model: Mapped[Model] = relationship(lazy="raise")


class RolloutTarget(Base):
    """One device in a rollout: its wave, its update's progress, and the model to roll back to."""

    __tablename__ = "rollout_targets"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        CheckConstraint(_in("state", TARGET_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    wave: Mapped[int] = mapped_column(Integer)  # 0: the canary
    state: Mapped[str] = mapped_column(String(16), default=TARGET_PENDING)
    reason: Mapped[str] = mapped_column(Text, default="")
    previous_model: Mapped[str] = mapped_column(String(TEXT_LEN), default="")  # model id the device ran
    previous_version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")
    sent_version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")  # last desired version published
    desired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    active_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    device: Mapped[Device] = relationship(lazy="raise")


class RetrainCycle(Base):
    """One cycle of the retraining service, as it reported it: what it did and why."""

    __tablename__ = "retrain_cycles"
    __table_args__ = (CheckConstraint(_in("outcome", RETRAIN_OUTCOMES), name="outcome"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(TEXT_LEN), default="")  # the model it retrains
    cycle: Mapped[int] = mapped_column(Integer)  # the service's own cycle number
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    new_images: Mapped[int] = mapped_column(Integer, default=0)  # reviewed images it had not trained on
    version: Mapped[str] = mapped_column(String(TEXT_LEN), default="")  # the candidate's, when published
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    rollout_id: Mapped[str | None] = mapped_column(String(ULID_LEN))
    gate: Mapped[str] = mapped_column(Text, default="{}")  # JSON: per-class AUROC of both models, false alarms
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
