"""The bytes of the code_interpreter images a stored item keeps (`output_bytes`, on
response and conversation items), which count in their owner's storage quota beside their
files' bytes; indexed by owner, so that the quota's sum reads the index alone. Items
stored before are counted from their bodies.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.store.storage_quota import kept_output_bytes

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

TABLES = ("response_items", "conversation_items")


def upgrade() -> None:
    for name in TABLES:
        op.add_column(
            name,
            sa.Column("output_bytes", sa.BigInteger, nullable=False, server_default="0"),
        )
        op.create_index(f"ix_{name}_owner_output_bytes", name, ["owner_id", "output_bytes"])
        _count_existing(name)


def _count_existing(name: str) -> None:
    """The bytes of the images each code_interpreter_call item stored so far keeps."""
    table = sa.table(
        name,
        sa.column("seq", sa.Integer),
        sa.column("body", sa.JSON),
        sa.column("output_bytes", sa.BigInteger),
    )
    bind = op.get_bind()
    calls = bind.execute(
        sa.select(table.c.seq, table.c.body).where(
            sa.cast(table.c.body, sa.Text).like("%code_interpreter_call%")
        )
    ).all()
    for seq, body in calls:
        if size := kept_output_bytes(body):
            bind.execute(sa.update(table).where(table.c.seq == seq).values(output_bytes=size))


def downgrade() -> None:
    for name in TABLES:
        op.drop_index(f"ix_{name}_owner_output_bytes", name)
        op.drop_column(name, "output_bytes")
