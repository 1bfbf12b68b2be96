"""Where each response's last prompt started its history, as the id of the item it started
at (`responses.history_start_item`), not a count of the items before it: deleting an
earlier item (a conversation's, or a response of a chain) would move a count one item on.

Responses recorded before this revision keep their count (`history_start`), read as
before; those recorded since have a null count, so after a downgrade they read as
starting at the whole history (their next turn is truncated anew).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("history_start_item", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("responses", "history_start_item")
