"""scheduler state on models: pending_since, waiting_cycles, usage

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_since", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("waiting_cycles", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("usage_gpu_s", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("usage_at", sa.Float(), nullable=True))
    # Models that already have pending data: their oldest pending item's arrival.
    op.execute(
        "UPDATE models SET pending_since = (SELECT MIN(received_at) FROM context_items "
        "WHERE context_items.model_id = models.id AND context_items.id > models.watermark) "
        "WHERE pending_tokens > 0"
    )


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("usage_at")
        batch_op.drop_column("usage_gpu_s")
        batch_op.drop_column("waiting_cycles")
        batch_op.drop_column("pending_since")
