"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 21:29:48.171347
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cycles",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "divergence_samples",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("probe_set", sa.String(length=200), nullable=True),
        sa.Column("kl", sa.Float(), nullable=True),
        sa.Column("tv", sa.Float(), nullable=True),
        sa.Column("top1", sa.Float(), nullable=True),
        sa.Column("dnll", sa.Float(), nullable=True),
        sa.Column("rel_weight_norm", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("divergence_samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_divergence_samples_created_at"), ["created_at"], unique=False)
        batch_op.create_index("ix_samples_model_version", ["model_id", "version"], unique=False)

    op.create_table(
        "drift_actions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("drift_actions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drift_actions_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_drift_actions_model_id"), ["model_id"], unique=False)

    op.create_table(
        "probe_sets",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("probe_sets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_probe_sets_base_model"), ["base_model"], unique=False)

    op.create_table(
        "query_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("parent_id", sa.String(length=200), nullable=False),
        sa.Column("query_sha256", sa.String(length=64), nullable=False),
        sa.Column("asker_id", sa.String(length=200), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("parent_id", "query_sha256", "asker_id", name="uq_query_asker"),
    )
    with op.batch_alter_table("query_log", schema=None) as batch_op:
        batch_op.create_index("ix_query_parent_sha", ["parent_id", "query_sha256"], unique=False)

    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.String(length=200), nullable=True),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("shares", sa.Float(), nullable=False),
        sa.Column("budget_gpu_s_per_day", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["parent_id"], ["tenants.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tenants_parent_id"), ["parent_id"], unique=False)

    op.create_table(
        "tier_schedules",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tier", "version", name="uq_tier_schedule_version"),
    )
    with op.batch_alter_table("tier_schedules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tier_schedules_tier"), ["tier"], unique=False)

    op.create_table(
        "training_runs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("cycle_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("slice_profile", sa.String(length=64), nullable=True),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_runs_cycle_id"), ["cycle_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_runs_name"), ["name"], unique=False)

    op.create_table(
        "usage",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("company_id", sa.String(length=200), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_company_id"), ["company_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_usage_recorded_at"), ["recorded_at"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("company_id", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["company_id"], ["tenants.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prefix"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("company_id", sa.String(length=200), nullable=False),
        sa.Column("team_id", sa.String(length=200), nullable=True),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("lora_rank", sa.Integer(), nullable=False),
        sa.Column("lora_alpha", sa.Float(), nullable=False),
        sa.Column("drift_state", sa.String(length=16), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("pending_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("item_count", sa.BigInteger(), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=True),
        sa.Column("last_version_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["tenants.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_company_id"), ["company_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_models_team_id"), ["team_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_models_tier"), ["tier"], unique=False)

    op.create_table(
        "adapter_versions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("parents", sa.JSON(), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("activated_at", sa.Float(), nullable=True),
        sa.Column("retired_at", sa.Float(), nullable=True),
        sa.Column("rolled_back_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "version", name="uq_version"),
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.create_index(
            "uq_one_active",
            ["model_id"],
            unique=True,
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )

    op.create_table(
        "context_items",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "sha256", name="uq_item_sha"),
    )
    with op.batch_alter_table("context_items", schema=None) as batch_op:
        batch_op.create_index("ix_items_model_id_id", ["model_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("context_items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_model_id_id")

    op.drop_table("context_items")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_one_active",
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )

    op.drop_table("adapter_versions")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_tier"))
        batch_op.drop_index(batch_op.f("ix_models_team_id"))
        batch_op.drop_index(batch_op.f("ix_models_company_id"))

    op.drop_table("models")
    op.drop_table("api_keys")
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_recorded_at"))
        batch_op.drop_index(batch_op.f("ix_usage_company_id"))

    op.drop_table("usage")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_runs_name"))
        batch_op.drop_index(batch_op.f("ix_training_runs_cycle_id"))

    op.drop_table("training_runs")
    with op.batch_alter_table("tier_schedules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tier_schedules_tier"))

    op.drop_table("tier_schedules")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tenants_parent_id"))

    op.drop_table("tenants")
    with op.batch_alter_table("query_log", schema=None) as batch_op:
        batch_op.drop_index("ix_query_parent_sha")

    op.drop_table("query_log")
    with op.batch_alter_table("probe_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_probe_sets_base_model"))

    op.drop_table("probe_sets")
    with op.batch_alter_table("drift_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_actions_model_id"))
        batch_op.drop_index(batch_op.f("ix_drift_actions_created_at"))

    op.drop_table("drift_actions")
    with op.batch_alter_table("divergence_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_samples_model_version")
        batch_op.drop_index(batch_op.f("ix_divergence_samples_created_at"))

    op.drop_table("divergence_samples")
    op.drop_table("cycles")
