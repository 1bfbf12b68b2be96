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
    Boolean,
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

from orchestrator.ids import Id

ID = Id()

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
    # The server running the turn, on PostgreSQL (`servers.py`): if it crashes, another
    # server ends the turn. Null on SQLite, whose database belongs to one server.
    Column("server_id", ID, nullable=True),
    # The response's place in its conversation: the `seq` of the last conversation item
    # before its own (0: none), set when its items are appended there. A chain from it
    # starts with the conversation's items up to there (those not deleted), even once its
    # own were deleted from the conversation. Null outside a conversation, before its
    # items are appended, and where migration 0011 found its items gone.
    Column("conversation_seq", Integer, nullable=True),
    # The id of the history item its last prompt started at (truncation "auto"; null: the
    # whole history): the next turn starts its history there too while it fits, so its
    # prompt extends this one and the prefix cache serves it. An id, which deleting
    # earlier items does not move.
    Column("history_start_item", ID, nullable=True),
    # How many history items its last prompt left out, for responses recorded between
    # migrations 0013 and 0014 (null otherwise); read when `history_start_item` is null.
    Column("history_start", Integer, nullable=True),
    Index("ix_responses_status_server_id", "status", "server_id"),
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
    # The bytes of the code_interpreter images the item keeps: the owner's storage (0022)
    Column("output_bytes", BigInteger, nullable=False, server_default="0"),
    UniqueConstraint("response_id", "id", name="uq_response_items_response_id_id"),
    Index("ix_response_items_response_id_seq", "response_id", "seq"),
    Index("ix_response_items_id", "id"),  # an item_reference names an item by its id alone
    Index("ix_response_items_owner_output_bytes", "owner_id", "output_bytes"),
)

# The storage a running response's code_interpreter images take, held from the run (its
# check against the owner's storage quota) until the response's output is written for good
# (`Repository.finish_response`, or a crash's recovery): `id` is the call item's, whose
# stored copies count the same bytes once. Migration 0023.
storage_holds = Table(
    "storage_holds",
    metadata,
    Column("id", ID, primary_key=True),
    Column(
        "response_id",
        ID,
        ForeignKey("responses.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("owner_id", ID, nullable=False, index=True),
    Column("bytes", BigInteger, nullable=False),
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
    Column("output_bytes", BigInteger, nullable=False, server_default="0"),  # as above
    UniqueConstraint("conversation_id", "id", name="uq_conversation_items_conversation_id_id"),
    Index("ix_conversation_items_conversation_id_seq", "conversation_id", "seq"),
    Index("ix_conversation_items_id", "id"),
    Index("ix_conversation_items_owner_output_bytes", "owner_id", "output_bytes"),
    # A deleted item's seq is never given again (SQLite reuses the highest rowids
    # otherwise), so an item added later can never fall before a response's place.
    sqlite_autoincrement=True,
)

# Uploaded files (`/v1/files`): the file object as `body`, and its bytes in `file_blobs`,
# written in the same transaction, so that every server on the database can read them.
# `expires_at` (also in the body): the second from which the file is gone (null: never),
# indexed for the sweep that deletes expired files.
files = Table(
    "files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False, unique=True),
    Column("owner_id", ID, nullable=False, index=True),
    Column("purpose", String(32), nullable=False),
    Column("content_type", String(128), nullable=True),
    Column("body", JSON, nullable=False),
    Column("bytes", BigInteger, nullable=False, server_default="0"),  # its blob's size
    Column("expires_at", BigInteger, nullable=True, index=True),
    # A deleted file's seq is never given again (as for each list paged by `seq`): its id
    # marks its place as a cursor (`cursor_tombstones`), and a file made later must sort
    # after that place, not on it (migration 0020).
    sqlite_autoincrement=True,
)

file_blobs = Table(
    "file_blobs",
    metadata,
    Column("file_id", ID, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

# Vector stores: the object as `body` without `file_counts`, `status` and `usage_bytes`,
# which are computed from the store's files when it is read, and without its expiry,
# kept in columns (a use moves `last_active_at` without rewriting the body; the store
# expires `expires_after_days` days after it, none when null).
vector_stores = Table(
    "vector_stores",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False, unique=True),
    Column("owner_id", ID, nullable=False, index=True),
    Column("body", JSON, nullable=False),
    Column("last_active_at", BigInteger, nullable=False, server_default="0"),
    Column("expires_after_days", Integer, nullable=True),
    sqlite_autoincrement=True,  # a deleted store's seq is never given again, as files'
)

# A file in a vector store, with its ingestion status (in_progress -> completed | failed)
# kept in `status` for queries and in `body` for reads.
vector_store_files = Table(
    "vector_store_files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False),  # the file's id, as OpenAI names it
    Column(
        "vector_store_id", ID, ForeignKey("vector_stores.id", ondelete="CASCADE"), nullable=False
    ),
    Column("owner_id", ID, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("body", JSON, nullable=False),
    # The file batch that added the file, if one did (a later add takes it out).
    Column("batch_id", ID, nullable=True, index=True),
    UniqueConstraint("vector_store_id", "id", name="uq_vector_store_files_store_id_id"),
    Index("ix_vector_store_files_id", "id"),
    sqlite_autoincrement=True,  # a removed file's seq is never given again, as files'
)

# File batches: the object as `body` without `status` and `file_counts`, computed from the
# files the batch added; `cancelled` once it was cancelled.
vector_store_file_batches = Table(
    "vector_store_file_batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False, unique=True),
    Column(
        "vector_store_id", ID, ForeignKey("vector_stores.id", ondelete="CASCADE"), nullable=False
    ),
    Column("owner_id", ID, nullable=False),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("body", JSON, nullable=False),
    Index("ix_vector_store_file_batches_store", "vector_store_id", "owner_id"),
)

# The place a deleted object held in a cursor-paginated list: its id and its sort key
# there (`position`: the `seq` of an item, a file, a vector store or a vector store's file;
# the `created_at` of a conversation). A list asked for the page after (or before) an id
# no longer listed finds it here and pages on from its place, as OpenAI's API does, so
# a loop deleting each item as it pages through a list deletes them all. `list_name` is
# the list's table and `parent_id` what the list belongs to (a conversation, a vector
# store, or the owner for their files, vector stores and conversations). Kept a day
# (`deleted_at`, indexed for the purge), and deleted with the list's parent.
cursor_tombstones = Table(
    "cursor_tombstones",
    metadata,
    Column("list_name", String(32), primary_key=True),
    Column("parent_id", ID, primary_key=True),
    Column("id", ID, primary_key=True),
    Column("owner_id", ID, nullable=False, index=True),
    Column("position", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=False, index=True),
)

# -- accounts ------------------------------------------------------------------------------

# A user: the owner of everything above (`owner_id` is a user's `id`), and the limits that
# apply to their requests (None: unlimited).
users = Table(
    "users",
    metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("token_quota", BigInteger, nullable=True),
    Column("quota_period", String(8), nullable=False),  # "day" | "month" | "total"
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("storage_quota_bytes", BigInteger, nullable=True),  # uploaded files' bytes
)

# An API key: only its SHA-256 digest is kept, with a short hint of the secret for lists.
# `expires_at`: the second from which it is refused (null: never).
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", ID, primary_key=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("hint", String(32), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("expires_at", BigInteger, nullable=True),
)

# A user's tokens in one quota period (`period_start`: the period's first second, 0 for
# "total"): settled usage and tokens reserved by requests still running. Admission
# reserves with one conditional UPDATE, so concurrent requests can never overspend.
quota_periods = Table(
    "quota_periods",
    metadata,
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("period_start", BigInteger, primary_key=True),
    Column("used", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
)

# A reservation not yet settled: kept so that one cut off by a crash can be released.
quota_reservations = Table(
    "quota_reservations",
    metadata,
    Column("id", ID, primary_key=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("period_start", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("server_id", ID, nullable=True),  # the server holding it, as `responses`
)

# A running request's usage so far, written with each checkpoint of a Responses turn, so
# that a crash still leaves the turn's usage row: the next start (on SQLite), or another
# server (on PostgreSQL, `servers.py`), settles it as `incomplete`, charging its
# reservation's period. Deleted when the request settles.
usage_checkpoints = Table(
    "usage_checkpoints",
    metadata,
    Column("id", ID, primary_key=True),
    Column("reservation_id", ID, nullable=True),
    Column("record", JSON, nullable=False),  # the UsageRecord, status "incomplete"
    Column("server_id", ID, nullable=True),  # the server running the request, as `responses`
    # The reservation's quota period, charged also once the reservation is gone (released
    # by a recovery before this checkpoint); null before migration 0021.
    Column("period_start", BigInteger, nullable=True),
)

# One row per generation request, however it ended, but for refusals before any compute
# (`UsageRecord.stored`). `user_id` is None for requests made with an `--api-key` key or
# on an open server; times are in seconds.
usage_records = Table(
    "usage_records",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("user_id", ID, nullable=True, index=True),
    Column("key_id", ID, nullable=True),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("queue_time", Double, nullable=True),
    Column("ttft", Double, nullable=True),
    Column("duration", Double, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("day", String(10), nullable=False, index=True),  # created_at's UTC date
    # The request's own id (its meter's): a request has one row however many times it is
    # settled (by itself, and by a recovery that took its server for gone). Null in rows
    # written before migration 0021.
    Column("request_id", ID, nullable=True),
    Index("ix_usage_records_request_id", "request_id", unique=True),
)
