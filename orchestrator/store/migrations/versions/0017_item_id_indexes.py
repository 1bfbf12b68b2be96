"""Indexes on the ids of response and conversation items: an `item_reference` input
item names a stored item by its id alone (`Repository.find_item`).

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_response_items_id", "response_items", ["id"])
    op.create_index("ix_conversation_items_id", "conversation_items", ["id"])


def downgrade() -> None:
    op.drop_index("ix_conversation_items_id", "conversation_items")
    op.drop_index("ix_response_items_id", "response_items")
