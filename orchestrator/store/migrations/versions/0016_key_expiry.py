"""API key expiry: `api_keys.expires_at`, the second from which a key is refused (null:
it never expires, as every key issued before this revision).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("expires_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "expires_at")
