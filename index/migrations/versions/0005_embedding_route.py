"""embedding route: how a stored vector was produced, "model" (the version embedded the item's source) or
"transform" (a learned map applied to the item's stored vector of another space; no source needed), so an
image backfill still re-embeds transformed items and every hit says which route produced its vector

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("route", sa.String(length=16), nullable=False, server_default="model"))


def downgrade() -> None:
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.drop_column("route")
