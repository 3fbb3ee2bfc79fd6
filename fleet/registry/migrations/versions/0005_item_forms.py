"""item_forms: the training forms generated for a context item on a base (augmentation)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "item_forms",
        sa.Column(
            "item_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("context_items.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("recipe", sa.String(length=32), nullable=False),
        sa.Column("forms", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", "base_model", "recipe"),
    )


def downgrade() -> None:
    op.drop_table("item_forms")
