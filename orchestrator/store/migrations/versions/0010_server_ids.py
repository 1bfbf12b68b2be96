"""The server that wrote a response, a quota reservation or a usage checkpoint: on a
PostgreSQL database shared by several servers, the rows a crashed server left behind
are recovered by another one (orchestrator/store/servers.py). Null on SQLite and in rows
written before this revision.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLES = ("responses", "quota_reservations", "usage_checkpoints")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("server_id", sa.String(64), nullable=True))
    # The periodic recovery's look-up: the servers of the responses in progress.
    op.create_index("ix_responses_status_server_id", "responses", ["status", "server_id"])


def downgrade() -> None:
    op.drop_index("ix_responses_status_server_id", "responses")
    for table in TABLES:
        op.drop_column(table, "server_id")
