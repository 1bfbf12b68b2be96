"""Vector store expiry: when each store was last used, and after how many days of
disuse it expires, as columns that a search moves in one conditional UPDATE.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "vector_stores",
        sa.Column("last_active_at", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.add_column("vector_stores", sa.Column("expires_after_days", sa.Integer, nullable=True))
    stores = sa.table(
        "vector_stores",
        sa.column("id", sa.String(64)),
        sa.column("body", sa.JSON),
        sa.column("last_active_at", sa.BigInteger),
    )
    bind = op.get_bind()
    for store_id, body in bind.execute(sa.select(stores.c.id, stores.c.body)).all():
        active = body.get("last_active_at") or body.get("created_at") or 0
        bind.execute(sa.update(stores).where(stores.c.id == store_id).values(last_active_at=active))


def downgrade() -> None:
    op.drop_column("vector_stores", "expires_after_days")
    op.drop_column("vector_stores", "last_active_at")
