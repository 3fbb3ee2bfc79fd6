"""drift monitor state: consecutive drift strikes per model; samples looked up by probe set

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drift_strikes", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("divergence_samples", schema=None) as batch_op:
        batch_op.create_index(
            "ix_samples_probe_model_version", ["probe_set", "model_id", "version"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("divergence_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_samples_probe_model_version")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("drift_strikes")
