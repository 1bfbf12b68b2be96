"""Conversations, responses and their items.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", ID, primary_key=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("last_response_id", ID, nullable=True),
    )
    op.create_index("ix_conversations_owner_id", "conversations", ["owner_id"])
    op.create_table(
        "responses",
        sa.Column("id", ID, primary_key=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_response_id", ID, nullable=True),
        sa.Column("conversation_id", ID, nullable=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("context_tokens", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_responses_owner_id", "responses", ["owner_id"])
    op.create_index("ix_responses_previous_response_id", "responses", ["previous_response_id"])
    op.create_index("ix_responses_conversation_id", "responses", ["conversation_id"])
    op.create_table(
        "response_items",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False),
        sa.Column(
            "response_id", ID, sa.ForeignKey("responses.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.UniqueConstraint("response_id", "id", name="uq_response_items_response_id_id"),
    )
    op.create_index("ix_response_items_response_id_seq", "response_items", ["response_id", "seq"])
    op.create_table(
        "conversation_items",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False),
        sa.Column(
            "conversation_id",
            ID,
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.UniqueConstraint(
            "conversation_id", "id", name="uq_conversation_items_conversation_id_id"
        ),
    )
    op.create_index(
        "ix_conversation_items_conversation_id_seq",
        "conversation_items",
        ["conversation_id", "seq"],
    )


def downgrade() -> None:
    op.drop_table("conversation_items")
    op.drop_table("response_items")
    op.drop_table("responses")
    op.drop_table("conversations")
