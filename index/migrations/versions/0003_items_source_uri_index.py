"""items.source_uri index: deleting an item (or a refused write) asks whether any other item still uses its
source bytes; without an index that is a scan of every item

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index("ix_items_source_uri", ["source_uri"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_source_uri")
