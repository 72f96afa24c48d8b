"""SQL tables of the gallery (SQLAlchemy 2 declarative models).

Portable types only (they run unchanged on SQLite and PostgreSQL): JSON via ``sqlalchemy.JSON``, vectors
via ``LargeBinary`` (float32, little-endian, L2-normalised), timestamps timezone-aware.

Layout, and why:
- ``model_versions``: one row per registered model version, with the space it writes into.
- ``items``: the external objects (id, metadata, where the raw item lives for later re-embedding).
- ``embeddings``: one row per (item, space). Kept apart from ``items`` so that an item can be backfilled into
  a new space while its old-space embedding keeps serving until the switch. ``vec_id`` is the FAISS id: every
  write of a vector takes a fresh one from ``counters``, so a FAISS index can be reconciled with SQL by
  comparing id sets, and a replaced vector can never be confused with its predecessor.
- ``embeddings.route``: ``model`` when ``version`` embedded the item's source, ``transform`` when the vector is
  a learned map of the item's stored vector in another space (a transform backfill): an image backfill
  still re-embeds those, and every hit says which route produced its vector.
- ``counters``: monotonically increasing counters, incremented with UPDATE inside the writing transaction
  (portable, and it serialises writers: the row lock on PostgreSQL, the write lock on SQLite), so the
  order of ``vec_id`` is the commit order.
- ``settings``: key/value (the active version lives under ``active_version``).
- ``backfill_jobs``: one row per backfill of the gallery into a candidate version. Per-item progress is the
  embeddings row itself: (item, candidate's space) with ``version == candidate`` means done.
- ``backfill_order``: a job's re-embedding order (uncertainty-first policy), written once when the job
  starts, so a resumed job follows the same order. ``backfill_skips``: items a job could not re-embed (no
  kept source, unreadable source) and why. Both cascade with their job and with the item.
- ``backfill_jobs.owner`` / ``lease_until``: which service replica runs a job, and until when its lease holds
  (several replicas share one database; another takes a job over once its owner stops renewing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")

VEC_ID_COUNTER = "vec_id"
ACTIVE_VERSION_KEY = "active_version"

NAME_LEN = 128  # versions, spaces
EXTERNAL_ID_LEN = 512


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    space: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    compatible_with: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    embedding_dim: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="registered")
    card: Mapped[dict[str, Any]] = mapped_column(JSON(none_as_null=True), default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    __tablename__ = "items"
    # who else uses these source bytes? asked on every delete (migration 0003)
    __table_args__ = (Index("ix_items_source_uri", "source_uri"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LEN), unique=True)
    # ``metadata`` is reserved on declarative classes; the column keeps the plain name.
    meta: Mapped[Any | None] = mapped_column("metadata", JSON(none_as_null=True), nullable=True)
    source_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    # server-side defaults: bulk inserts then carry no per-row timestamp parameters
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Embedding(Base):
    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("item_id", "space", name="uq_embeddings_item_space"),
        # reconcile scans a space in vec_id order; counts group by version
        Index("ix_embeddings_space_vec_id", "space", "vec_id"),
        Index("ix_embeddings_version", "version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    space: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    vec_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # how the vector was produced (migration 0005): "model" (``version`` embedded the item's source) or
    # "transform" (a map of the item's stored vector in another space into ``version``'s; no source read)
    route: Mapped[str] = mapped_column(String(16), server_default="model", default="model")


class Counter(Base):
    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BackfillJob(Base):
    __tablename__ = "backfill_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    candidate: Mapped[str] = mapped_column(ForeignKey("model_versions.version"), index=True)
    space: Mapped[str] = mapped_column(String(NAME_LEN))
    # pending / running / paused / cancelled / done / failed
    status: Mapped[str] = mapped_column(String(32), default="pending")
    policy: Mapped[Any | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the lease (migration 0004): the replica running the job, and until when; null while nobody runs it
    owner: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BackfillOrder(Base):
    __tablename__ = "backfill_order"
    __table_args__ = (
        # deleting an item cascades here: without an index on item_id every delete would scan the table
        Index("ix_backfill_order_item", "item_id"),
    )

    job_id: Mapped[int] = mapped_column(ForeignKey("backfill_jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 0 = re-embedded first
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # the policy's priority (lower first)


class BackfillSkip(Base):
    __tablename__ = "backfill_skips"
    __table_args__ = (Index("ix_backfill_skips_item", "item_id"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("backfill_jobs.id", ondelete="CASCADE"), primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(256))


def create_schema(engine: Engine) -> None:
    """Migrate the database to the newest schema (Alembic) and seed the counter and settings rows.

    Idempotent. The one place that creates or changes the schema: every change ships as a migration in
    ``index/migrations/versions`` (a test checks that the migrations produce exactly these tables).
    """
    from index.migrate import upgrade

    upgrade(engine)
    try:
        with engine.begin() as conn:
            if conn.execute(select(Counter.name).where(Counter.name == VEC_ID_COUNTER)).first() is None:
                conn.execute(insert(Counter).values(name=VEC_ID_COUNTER, value=0))
            if conn.execute(select(Setting.key).where(Setting.key == ACTIVE_VERSION_KEY)).first() is None:
                conn.execute(insert(Setting).values(key=ACTIVE_VERSION_KEY, value=None))
    except IntegrityError:
        pass  # another process seeded them between our SELECT and INSERT


def drop_schema(engine: Engine) -> None:
    """Drop every gallery table and the migration record (tests only)."""
    from sqlalchemy import text

    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
