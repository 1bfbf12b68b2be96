"""Where each response's last prompt started its history (`responses.history_start`: how
many history items truncation "auto" left out), so the next turn starts there too while
it fits and its prompt extends the previous one, which the prefix cache then serves.

Responses recorded before this revision have a null start, read as the whole history.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("history_start", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("responses", "history_start")
