"""The store's schema, as SQLAlchemy Core tables.

Every row carries `owner_id`, and every repository query filters on it, so one user
can never read or change another's objects. Items live in two tables: a response's
own input and output items (`response_items`), and a conversation's items
(`conversation_items`, copies sharing the same item ids): deleting a response does not
rewrite a conversation's history, and deleting either removes its rows for real.

The Alembic migrations in `migrations/versions` create exactly this schema; a test
compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

ID = String(64)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", ID, primary_key=True),
    Column("owner_id", ID, nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("meta", JSON, nullable=False),
    # The latest response recorded in this conversation: its prompt+output tokens are
    # where the next turn's prompt should continue from.
    Column("last_response_id", ID, nullable=True),
)

responses = Table(
    "responses",
    metadata,
    Column("id", ID, primary_key=True),
    Column("owner_id", ID, nullable=False, index=True),
    Column("created_at", Double, nullable=False),
    Column("status", String(16), nullable=False),
    Column("previous_response_id", ID, nullable=True, index=True),
    Column("conversation_id", ID, nullable=True, index=True),
    # The response object without `output` (that is the output items below).
    Column("body", JSON, nullable=False),
    # Prompt + output token ids (little-endian uint32): the next turn extends them.
    Column("context_tokens", LargeBinary, nullable=True),
)

response_items = Table(
    "response_items",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False),
    Column("response_id", ID, ForeignKey("responses.id", ondelete="CASCADE"), nullable=False),
    Column("owner_id", ID, nullable=False),
    Column("kind", String(8), nullable=False),  # "input" | "output"
    Column("body", JSON, nullable=False),
    UniqueConstraint("response_id", "id", name="uq_response_items_response_id_id"),
    Index("ix_response_items_response_id_seq", "response_id", "seq"),
)

conversation_items = Table(
    "conversation_items",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False),
    Column(
        "conversation_id", ID, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    ),
    Column("owner_id", ID, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("body", JSON, nullable=False),
    UniqueConstraint("conversation_id", "id", name="uq_conversation_items_conversation_id_id"),
    Index("ix_conversation_items_conversation_id_seq", "conversation_id", "seq"),
)
