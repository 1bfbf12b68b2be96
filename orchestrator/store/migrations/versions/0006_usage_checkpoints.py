"""Running requests' usage so far, which a crash would otherwise lose.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "usage_checkpoints",
        sa.Column("id", ID, primary_key=True),
        sa.Column("reservation_id", ID, nullable=True),
        sa.Column("record", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage_checkpoints")
