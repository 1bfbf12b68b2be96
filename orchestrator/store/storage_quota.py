"""The owner's storage and its quota: what counts, and the check every write of it takes.

A user's storage is their live uploaded files' bytes and the code_interpreter images their
stored items keep (`output_bytes` of response and conversation items) or their running
responses hold (`storage_holds`). Every write that adds to it checks the quota in the
transaction that writes it (`check_room`, under the user's row lock): uploads
(`knowledge.add_file`), code_interpreter runs (`knowledge.hold_storage`), and the items
a client gives (`Repository.begin_response`, `create_conversation`,
`add_conversation_items`), which may carry an earlier run's images.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, or_, select, union, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from orchestrator.errors import StorageQuotaExceededError
from orchestrator.store.tables import (
    conversation_items,
    files,
    response_items,
    storage_holds,
    users,
)


def output_bytes(outputs: list[dict] | None) -> int:
    """The bytes a code_interpreter_call's `outputs` keep in the store beyond its text: its
    images' data URLs, as stored (the run's files, ~4/3 of their size in base64). They
    count in the owner's storage quota, as an upload's bytes do."""
    return sum(len(o.get("url") or "") for o in outputs or [] if o.get("type") == "image")


def kept_output_bytes(item: dict) -> int:
    """`output_bytes` of a stored item (0 for any but a code_interpreter_call)."""
    if item.get("type") != "code_interpreter_call":
        return 0
    return output_bytes(item.get("outputs"))


def live_files(now: int) -> ColumnElement[bool]:
    """The files not expired at `now`."""
    return or_(files.c.expires_at.is_(None), files.c.expires_at > now)


def locked_storage(conn: Connection, owner: str, now: int) -> tuple[int, int | None]:
    """The owner's storage used and their quota (None: none), read after a no-op update of
    their user row, which takes its row lock on PostgreSQL and the database's write lock
    on SQLite before anything is read, so that concurrent writes of their storage
    (uploads, code_interpreter runs' holds, items given back; threads, or servers sharing
    a database) are checked one after another and cannot each fit into the same last
    bytes of the quota."""
    quota_bytes = users.c.storage_quota_bytes
    conn.execute(update(users).where(users.c.id == owner).values(storage_quota_bytes=quota_bytes))
    quota = conn.execute(select(quota_bytes).where(users.c.id == owner)).scalar()
    return (0, None) if quota is None else (storage_used(conn, owner, now), quota)


def check_room(
    conn: Connection,
    owner: str,
    size: int,
    now: int,
    refusal: Callable[[int, int], StorageQuotaExceededError],
) -> None:
    """Raise `refusal(used, quota)` when `size` more bytes do not fit what the owner's
    quota leaves, read under their row lock (`locked_storage`). The caller writes the
    bytes in the same transaction, which holds the lock until they count: every write of
    the owner's storage (an upload, a code_interpreter run's hold, items given back)
    passes here."""
    used, quota = locked_storage(conn, owner, now)
    if quota is not None and used + size > quota:
        raise refusal(used, quota)


def check_given_items(
    conn: Connection, owner: str, items: list[dict], now: int, param: str
) -> None:
    """StorageQuotaExceededError (at `param`) when the images that the items a client
    gives keep (code_interpreter_calls given back, each stored as a copy of its own) do
    not fit what the owner's quota leaves (`check_room`); items that keep none are not
    checked, and take no lock."""
    size = sum(kept_output_bytes(item) for item in items)
    if size == 0:
        return

    def refusal(used: int, quota: int) -> StorageQuotaExceededError:
        return StorageQuotaExceededError(
            f"The code_interpreter images these items keep ({size} bytes) do not fit your "
            f"storage quota: your files and the images kept with your responses and "
            f"conversations take {used} of your {quota} bytes. Give the calls back without "
            "their image outputs, or delete files, responses or conversations to make room.",
            param=param,
            code="storage_quota_exceeded",
        )

    check_room(conn, owner, size, now, refusal)


def storage_used(conn: Connection, owner: str, now: int) -> int:
    """The owner's live files' bytes and the code_interpreter images their stored items
    keep (`output_bytes`) or their running responses hold (`storage_holds`): a response's
    item, its conversation's copy and its hold share an id and are one image. Sums as
    ints: PostgreSQL sums a BIGINT as NUMERIC, which psycopg returns as a Decimal (not
    JSON)."""
    uploaded = select(func.coalesce(func.sum(files.c.bytes), 0)).where(
        files.c.owner_id == owner, live_files(now)
    )
    kept = union(
        *(
            select(table.c.id, table.c.output_bytes).where(
                table.c.owner_id == owner, table.c.output_bytes > 0
            )
            for table in (response_items, conversation_items)
        ),
        select(storage_holds.c.id, storage_holds.c.bytes).where(storage_holds.c.owner_id == owner),
    ).subquery()
    images = select(func.coalesce(func.sum(kept.c.output_bytes), 0))
    return int(conn.execute(uploaded).scalar_one()) + int(conn.execute(images).scalar_one())
