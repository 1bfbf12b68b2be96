"""`storage_holds`: the storage a running response's code_interpreter images take, held
from their run (its check against the owner's storage quota) until the response's output
is written for good, when its items count the same bytes.

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "storage_holds",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "response_id",
            ID,
            sa.ForeignKey("responses.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("owner_id", ID, nullable=False, index=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("storage_holds")
