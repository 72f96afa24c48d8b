"""backfill order and skips: a job's re-embedding order (resume follows it) and the items it could not re-embed

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 11:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_order",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["backfill_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "position"),
    )
    with op.batch_alter_table("backfill_order", schema=None) as batch_op:
        batch_op.create_index("ix_backfill_order_item", ["item_id"], unique=False)

    op.create_table(
        "backfill_skips",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["backfill_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "item_id"),
    )
    with op.batch_alter_table("backfill_skips", schema=None) as batch_op:
        batch_op.create_index("ix_backfill_skips_item", ["item_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("backfill_skips", schema=None) as batch_op:
        batch_op.drop_index("ix_backfill_skips_item")

    op.drop_table("backfill_skips")
    with op.batch_alter_table("backfill_order", schema=None) as batch_op:
        batch_op.drop_index("ix_backfill_order_item")

    op.drop_table("backfill_order")
