"""Each usage row's request id, unique: a request is settled into one row however many
times it is settled (by itself, and by another server's recovery that took its server for
gone when the session holding its lock was cut). Rows written before have none. A usage
checkpoint keeps its reservation's quota period, which a recovery charges also once the
reservation was released.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("request_id", sa.String(64), nullable=True))
    op.create_index("ix_usage_records_request_id", "usage_records", ["request_id"], unique=True)
    op.add_column("usage_checkpoints", sa.Column("period_start", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("usage_checkpoints", "period_start")
    op.drop_index("ix_usage_records_request_id", "usage_records")
    op.drop_column("usage_records", "request_id")
