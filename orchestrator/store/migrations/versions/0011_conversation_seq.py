"""A response's place in its conversation (`responses.conversation_seq`: the `seq` of the
last conversation item before its own), so that a chain from it keeps the conversation's
earlier items when its own were deleted from the conversation; and conversation item
seqs that SQLite never gives again (AUTOINCREMENT), so no later item falls before it.

Responses recorded before this revision get the place their items show: the seq before
the first of them still in the conversation. One whose items were all deleted already
keeps a null place, and a chain from it starts with its own items, as before.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.add_column("responses", sa.Column("conversation_seq", sa.Integer, nullable=True))
    responses = sa.table(
        "responses",
        sa.column("id", ID),
        sa.column("owner_id", ID),
        sa.column("conversation_id", ID),
        sa.column("conversation_seq", sa.Integer),
    )
    response_items = sa.table("response_items", sa.column("id", ID), sa.column("response_id", ID))
    conversation_items = sa.table(
        "conversation_items",
        sa.column("seq", sa.Integer),
        sa.column("id", ID),
        sa.column("conversation_id", ID),
        sa.column("owner_id", ID),
    )
    first_own = (
        sa.select(sa.func.min(conversation_items.c.seq) - 1)
        .join(response_items, response_items.c.id == conversation_items.c.id)
        .where(
            response_items.c.response_id == responses.c.id,
            conversation_items.c.conversation_id == responses.c.conversation_id,
            conversation_items.c.owner_id == responses.c.owner_id,
        )
        .scalar_subquery()
    )
    op.execute(
        sa.update(responses)
        .where(responses.c.conversation_id.is_not(None))
        .values(conversation_seq=first_own)
    )
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "conversation_items", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass


def downgrade() -> None:
    op.drop_column("responses", "conversation_seq")
