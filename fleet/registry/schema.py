"""The registry's tables (SQLAlchemy 2 declarative models).

Timestamps are float seconds since the epoch (UTC): portable across SQLite and
PostgreSQL and cheap for the scheduler's arithmetic over a million rows.
Schema changes go through Alembic migrations in ``migrations/versions``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only aliases rowid (fast autoincrement) for INTEGER primary keys.
BigId = BigInteger().with_variant(Integer(), "sqlite")
ID_LEN = 200  # 3 segments of at most 63 chars plus separators


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    """A node of the company → team → individual tree."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(
        String(ID_LEN), ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    level: Mapped[str] = mapped_column(String(16))
    shares: Mapped[float] = mapped_column(Float, default=1.0)
    budget_gpu_s_per_day: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class Model(Base):
    """The one model of a tenant node: its base, adapter shape, tier and data accounting."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("tenants.id", ondelete="RESTRICT"), primary_key=True
    )
    company_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    team_id: Mapped[str | None] = mapped_column(String(ID_LEN), index=True)
    tier: Mapped[str] = mapped_column(String(16), index=True)
    base_model: Mapped[str] = mapped_column(String(200))
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_alpha: Mapped[float] = mapped_column(Float)
    drift_state: Mapped[str] = mapped_column(String(16), default="ok")
    # Consecutive drift strikes (warn, rollback, reject); freeze_after of them freeze the model.
    drift_strikes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Newest context item id learned by the active version; pending = items after it.
    watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    item_count: Mapped[int] = mapped_column(BigInteger, default=0)
    active_version: Mapped[int | None] = mapped_column(Integer)
    last_version_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    # Scheduler state: when the oldest pending item arrived, cycles passed over with pending
    # data (aging), and the model's own GPU-seconds, decayed lazily from usage_at.
    pending_since: Mapped[float | None] = mapped_column(Float)
    waiting_cycles: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    usage_gpu_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    usage_at: Mapped[float | None] = mapped_column(Float)


class AdapterVersion(Base):
    """An immutable adapter version; only ``state`` and its timestamps change."""

    __tablename__ = "adapter_versions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("models.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    base_model: Mapped[str] = mapped_column(String(200))
    parents: Mapped[list[Any]] = mapped_column(JSON, default=list)
    watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    activated_at: Mapped[float | None] = mapped_column(Float)
    retired_at: Mapped[float | None] = mapped_column(Float)
    rolled_back_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_version"),
        # Exactly one active version per model, enforced by the database itself.
        Index(
            "uq_one_active",
            "model_id",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )


class ContextItem(Base):
    """A piece of a model's private context; deduplicated by sha256 per model."""

    __tablename__ = "context_items"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("models.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    received_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("model_id", "sha256", name="uq_item_sha"),
        Index("ix_items_model_id_id", "model_id", "id"),
    )


class ItemForms(Base):
    """The training forms fleet generated for one context item on one base (questions with the
    base's answers, paraphrases): generated once, read by every run (and every restart) after."""

    __tablename__ = "item_forms"
    item_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("context_items.id", ondelete="CASCADE"), primary_key=True
    )
    base_model: Mapped[str] = mapped_column(String(128), primary_key=True)
    recipe: Mapped[str] = mapped_column(String(32), primary_key=True)
    forms: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class QueryLog(Base):
    """Who asked a normalized query, per parent (team or company): the repeated-query signal."""

    __tablename__ = "query_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    parent_id: Mapped[str] = mapped_column(String(ID_LEN))
    query_sha256: Mapped[str] = mapped_column(String(64))
    asker_id: Mapped[str] = mapped_column(String(ID_LEN))
    query: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("parent_id", "query_sha256", "asker_id", name="uq_query_asker"),
        Index("ix_query_parent_sha", "parent_id", "query_sha256"),
    )


class ApiKey(Base):
    """An API key scoped to a company; only its sha256 is stored."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    company_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("tenants.id", ondelete="RESTRICT"))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class TrainingRun(Base):
    """One Ray Train run over one pack."""

    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    cycle_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    status: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(200))
    slice_profile: Mapped[str | None] = mapped_column(String(64))
    members: Mapped[list[Any]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Cycle(Base):
    """One pass of the control loop."""

    __tablename__ = "cycles"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)


class Usage(Base):
    """GPU-seconds a company used (training), for fair share and budgets."""

    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    company_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    tier: Mapped[str | None] = mapped_column(String(16))
    gpu_seconds: Mapped[float] = mapped_column(Float)
    run_id: Mapped[int | None] = mapped_column(BigInteger)
    recorded_at: Mapped[float] = mapped_column(Float, index=True)


class DivergenceSample(Base):
    """One drift measurement of one version against the base or its parent."""

    __tablename__ = "divergence_samples"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(ID_LEN))
    version: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(16))
    relation: Mapped[str] = mapped_column(String(16))  # base | parent
    probe_set: Mapped[str | None] = mapped_column(String(200))
    kl: Mapped[float | None] = mapped_column(Float)
    tv: Mapped[float | None] = mapped_column(Float)
    top1: Mapped[float | None] = mapped_column(Float)
    dnll: Mapped[float | None] = mapped_column(Float)
    rel_weight_norm: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, index=True)

    __table_args__ = (
        Index("ix_samples_model_version", "model_id", "version"),
        Index("ix_samples_probe_model_version", "probe_set", "model_id", "version"),
    )


class DriftActionRow(Base):
    """An action the drift policy took on a model (warn, freeze, rollback, reject, unfreeze)."""

    __tablename__ = "drift_actions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class ProbeSet(Base):
    """A versioned probe set per base model; its cached base log-probs live in the store."""

    __tablename__ = "probe_sets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_model: Mapped[str] = mapped_column(String(200), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class TierSchedule(Base):
    """A tier's learning schedule, versioned; the newest one is what training uses."""

    __tablename__ = "tier_schedules"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tier: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("tier", "version", name="uq_tier_schedule_version"),)
