"""Cursor tombstones: the place each deleted object held in its cursor-paginated list,
so that a page asked for after (or before) a deleted object's id continues from there
rather than being a 404 (a loop deleting every item as it pages through a list).
Objects deleted before this revision left none: their ids stay unknown cursors.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "cursor_tombstones",
        sa.Column("list_name", sa.String(32), primary_key=True),
        sa.Column("parent_id", ID, primary_key=True),
        sa.Column("id", ID, primary_key=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_cursor_tombstones_owner_id", "cursor_tombstones", ["owner_id"])
    op.create_index("ix_cursor_tombstones_deleted_at", "cursor_tombstones", ["deleted_at"])


def downgrade() -> None:
    op.drop_table("cursor_tombstones")
