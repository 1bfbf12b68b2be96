"""The repositories of files, vector stores and their files, and the retrieval index.

Plain functions taking the `Repository` first, so they run through the same
`await store.call(fn, owner, ...)` on the store's thread. Every statement filters on the
owner. A vector store file's chunks are written in the same transaction that marks it
completed, and deleting a file deletes its chunks (the index's triggers take the vectors
and the full-text rows with them), so the index never holds a chunk of a file that is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy import func, insert, or_, select, true, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement

from orchestrator.errors import StorageQuotaExceededError
from orchestrator.retrieval import pg_index
from orchestrator.retrieval.index import (
    ChunkRecord,
    ChunkTableIndex,
    Hit,
    SearchRequest,
    SqliteIndex,
)
from orchestrator.store import storage_quota
from orchestrator.store.advisory_claims import MIGRATION_LOCK
from orchestrator.store.repository import (
    ItemPage,
    Page,
    Repository,
    _page,
    delete_listed,
    delete_owned,
    forget_list,
)
from orchestrator.store.storage_quota import check_room, live_files
from orchestrator.store.tables import (
    file_blobs,
    files,
    storage_holds,
    vector_store_file_batches,
    vector_store_files,
    vector_stores,
)


@dataclass(frozen=True)
class FileCounts:
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        return self.in_progress + self.completed + self.failed + self.cancelled


def index_for(repo: Repository) -> ChunkTableIndex | None:
    """The retrieval index of this database: SQLite's (made by the migrations), or on
    PostgreSQL the pgvector one once `prepare_index` made it (else None)."""
    if repo.engine.dialect.name == "sqlite":
        return SqliteIndex()
    return repo.retrieval_index


def prepare_index(repo: Repository) -> str | None:
    """Make the retrieval index ready (on PostgreSQL: the pgvector extension, the table
    and its indexes, if missing); None when ready, else why it cannot be."""
    if repo.engine.dialect.name == "sqlite":
        return None
    with repo.engine.connect() as conn:
        reason = pg_index.unavailable_reason(conn)
    if reason is not None:
        return reason
    index = pg_index.PgIndex()
    try:
        with repo.engine.begin() as conn:
            # Servers sharing the database may start together: under the migrations' lock
            # they make or upgrade the index one after another, where two at once collide
            # (CREATE EXTENSION IF NOT EXISTS is not atomic) or deadlock on the table's locks.
            conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            index.create_schema(conn)
    except DBAPIError as exc:
        return f"creating the pgvector index failed: {str(exc.orig).strip()}"
    repo.retrieval_index = index
    return None


def _index(repo: Repository) -> ChunkTableIndex:
    index = index_for(repo)
    if index is None:
        raise RuntimeError("this database holds no retrieval index (see prepare_index)")
    return index


# -- files -------------------------------------------------------------------------------
#
# A file whose `expires_at` has passed is gone: every read below takes the caller's `now`
# and finds only the files live at it, until `delete_expired_files` deletes the rest.


def add_file(
    repo: Repository, owner: str, body: dict, content_type: str | None, data: bytes
) -> None:
    """The file object and its bytes, in one transaction; StorageQuotaExceededError if
    they would take the owner's live files (at the file's `created_at`) past the owner's
    storage quota."""
    with repo.engine.begin() as conn:
        _check_storage_quota(conn, owner, len(data), body["created_at"])
        conn.execute(
            insert(files).values(
                id=body["id"],
                owner_id=owner,
                purpose=body["purpose"],
                content_type=content_type,
                body=body,
                bytes=len(data),
                expires_at=body["expires_at"],
            )
        )
        conn.execute(insert(file_blobs).values(file_id=body["id"], data=data))


def _check_storage_quota(conn: Connection, owner: str, size: int, now: int) -> None:
    """StorageQuotaExceededError when an upload of `size` bytes does not fit
    (`check_room`)."""

    def refusal(used: int, quota: int) -> StorageQuotaExceededError:
        return StorageQuotaExceededError(
            f"This file ({size} bytes) does not fit your storage quota: your files and the "
            f"code_interpreter images kept with your responses take {used} of your {quota} "
            "bytes. Delete files (or those responses and conversations) to make room, or "
            "ask the operator for more.",
            param="file",
            code="storage_quota_exceeded",
        )

    check_room(conn, owner, size, now, refusal)


def hold_storage(
    repo: Repository, owner: str, response_id: str, item_id: str, size: int, now: int
) -> None:
    """Hold `size` bytes of the owner's storage for the images of a code_interpreter run
    (the call item `item_id`) of their stored response, checked and held in one
    transaction as an upload is, until the response's output is written for good; the
    item's stored copies then count the same bytes (`storage_quota.storage_used`).
    StorageQuotaExceededError when they do not fit what the quota leaves."""

    def refusal(used: int, quota: int) -> StorageQuotaExceededError:
        return StorageQuotaExceededError(
            f"the run's images take {size} bytes, more than the {quota - used} bytes "
            f"left of your storage quota ({quota} bytes), so none of them is kept. Delete "
            "files, or responses that keep images, to make room, or write smaller images.",
            code="storage_quota_exceeded",
        )

    with repo.engine.begin() as conn:
        check_room(conn, owner, size, now, refusal)
        conn.execute(
            insert(storage_holds).values(
                id=item_id, response_id=response_id, owner_id=owner, bytes=size
            )
        )


def storage_used(repo: Repository, owner: str, now: int) -> int:
    """The bytes of the owner's storage at `now` (`storage_quota.storage_used`)."""
    with repo.engine.connect() as conn:
        return storage_quota.storage_used(conn, owner, now)


def file_content(
    repo: Repository, owner: str, file_id: str, now: int
) -> tuple[dict, str | None, bytes] | None:
    """The file object, its declared content type and its bytes, in one query."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(files.c.body, files.c.content_type, file_blobs.c.data)
            .join(file_blobs, file_blobs.c.file_id == files.c.id)
            .where(files.c.id == file_id, files.c.owner_id == owner, live_files(now))
        ).first()
    return None if row is None else (row.body, row.content_type, row.data)


def import_file_bytes(repo: Repository, file_id: str, data: bytes) -> bool:
    """Store the bytes of a file whose row has none (kept on disk by an earlier version);
    False when there is no such row, or it has its bytes already."""
    with repo.engine.begin() as conn:
        found = conn.execute(
            select(files.c.id)
            .outerjoin(file_blobs, file_blobs.c.file_id == files.c.id)
            .where(files.c.id == file_id, file_blobs.c.file_id.is_(None))
        ).first()
        if found is None:
            return False
        conn.execute(insert(file_blobs).values(file_id=file_id, data=data))
        conn.execute(update(files).where(files.c.id == file_id).values(bytes=len(data)))
    return True


def get_file(
    repo: Repository, owner: str, file_id: str, now: int
) -> tuple[dict, str | None] | None:
    """The file object and its declared content type."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(files.c.body, files.c.content_type).where(
                files.c.id == file_id, files.c.owner_id == owner, live_files(now)
            )
        ).first()
    return None if row is None else (row.body, row.content_type)


def list_files(repo: Repository, owner: str, page: Page, purpose: str | None, now: int) -> ItemPage:
    """A page of the owner's live files; a cursor that has expired since its page still
    marks the place (`_page` finds it among all the owner's files)."""
    with repo.engine.connect() as conn:
        only = (
            [live_files(now)] if purpose is None else [live_files(now), files.c.purpose == purpose]
        )
        return _page(conn, files, files.c.owner_id, owner, owner, page, only=only)


def delete_file(repo: Repository, owner: str, file_id: str, now: int | None) -> bool:
    """Delete the file (if live at `now`; with None, expired or not, as a user's deletion
    takes every file), its bytes, its place in every vector store, and its chunks."""
    index = index_for(repo)
    condition = true() if now is None else live_files(now)
    with repo.engine.begin() as conn:
        return _delete_file(conn, index, owner, file_id, condition)


def _delete_file(
    conn: Connection,
    index: ChunkTableIndex | None,
    owner: str,
    file_id: str,
    condition: ColumnElement[bool],
) -> bool:
    """Delete the file if it meets `condition`, with its bytes, its place in every vector
    store and its chunks; False (nothing written) when no such file is the owner's."""
    found = conn.execute(
        select(files.c.id).where(files.c.id == file_id, files.c.owner_id == owner, condition)
    ).first()
    if found is None:
        return False
    stores = (
        conn.execute(
            select(vector_store_files.c.vector_store_id).where(
                vector_store_files.c.id == file_id, vector_store_files.c.owner_id == owner
            )
        )
        .scalars()
        .all()
    )
    for store_id in stores:
        _remove_store_file(conn, index, owner, store_id, file_id)
    # its bytes go with the row (file_blobs' foreign key cascades)
    return delete_listed(conn, files, files.c.owner_id, owner, owner, files.c.id == file_id) > 0


def delete_expired_files(repo: Repository, now: int, most: int) -> list[tuple[str, str]]:
    """Delete up to `most` of the files (of every owner) expired at `now`, oldest first, as
    `delete_file` does, in one transaction; their (owner, id). Servers sharing a database
    may sweep at once: a file another one deleted first is skipped."""
    index = index_for(repo)
    expired = files.c.expires_at <= now
    with repo.engine.begin() as conn:
        rows = conn.execute(
            select(files.c.owner_id, files.c.id).where(expired).order_by(files.c.seq).limit(most)
        ).all()
        return [
            (row.owner_id, row.id)
            for row in rows
            if _delete_file(conn, index, row.owner_id, row.id, expired)
        ]


# -- vector stores -----------------------------------------------------------------------

DAY = 86_400  # seconds: `expires_after.days` counts these after `last_active_at`
# A use moves `last_active_at` only once this many seconds have passed since it last did
# (a store expires days after it: a minute early at most spares a write per search).
ACTIVE_EVERY = 60
_EXPIRY = ("last_active_at", "expires_after", "expires_at")  # kept in columns, not the body


def store_expires_at(last_active_at: int, days: int | None) -> int | None:
    """When a vector store expires: `days` after its last use (None: never)."""
    return None if days is None else last_active_at + days * DAY


def _expiry_days(expires_after: dict | None) -> int | None:
    return None if expires_after is None else expires_after["days"]


def _with_expiry(row: Row) -> dict:
    """The stored body with `last_active_at` and `expires_after` from their columns."""
    days = row.expires_after_days
    return {
        **row.body,
        "last_active_at": row.last_active_at,
        "expires_after": None if days is None else {"anchor": "last_active_at", "days": days},
    }


# The columns `_with_expiry` reads beside the body.
_EXPIRY_COLUMNS = (vector_stores.c.last_active_at, vector_stores.c.expires_after_days)


def _stored_stores():
    return select(vector_stores.c.body, *_EXPIRY_COLUMNS)


def add_vector_store(repo: Repository, owner: str, body: dict, store_files: list[dict]) -> None:
    """Record the store (`body` the vector store object, its `last_active_at` and
    `expires_after` going to their columns) and add its files."""
    with repo.engine.begin() as conn:
        conn.execute(
            insert(vector_stores).values(
                id=body["id"],
                owner_id=owner,
                body={k: v for k, v in body.items() if k not in _EXPIRY},
                last_active_at=body["last_active_at"],
                expires_after_days=_expiry_days(body["expires_after"]),
            )
        )
        _insert_store_files(conn, owner, body["id"], store_files)


def get_vector_store(
    repo: Repository, owner: str, vector_store_id: str
) -> tuple[dict, FileCounts, int] | None:
    """The stored body (with `last_active_at` and `expires_after`), its files' counts by
    status, and the bytes of its completed files."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            _stored_stores().where(
                vector_stores.c.id == vector_store_id, vector_stores.c.owner_id == owner
            )
        ).first()
        if row is None:
            return None
        return _with_expiry(row), *_counts(conn, owner, vector_store_id)


def list_vector_stores(
    repo: Repository, owner: str, page: Page
) -> tuple[ItemPage, list[tuple[FileCounts, int]]]:
    with repo.engine.connect() as conn:
        owned = vector_stores.c.owner_id
        found = _page(
            conn, vector_stores, owned, owner, owner, page, _EXPIRY_COLUMNS, item=_with_expiry
        )
        return found, [_counts(conn, owner, b["id"]) for b in found.items]


def update_vector_store(repo: Repository, owner: str, vector_store_id: str, changes: dict) -> bool:
    """Apply `changes` to the body; an `expires_after` among them (None: none) replaces
    the store's expiry."""
    where = (vector_stores.c.id == vector_store_id, vector_stores.c.owner_id == owner)
    with repo.engine.begin() as conn:
        body = conn.execute(select(vector_stores.c.body).where(*where)).scalar()
        if body is None:
            return False
        values: dict = {"body": {**body, **{k: v for k, v in changes.items() if k not in _EXPIRY}}}
        if "expires_after" in changes:
            values["expires_after_days"] = _expiry_days(changes["expires_after"])
        conn.execute(update(vector_stores).where(*where).values(**values))
    return True


def mark_vector_store_active(
    repo: Repository, owner: str, vector_store_id: str, now: int
) -> bool | None:
    """Record a use of the store at `now`: True when it is usable (not expired at `now`),
    False when it has expired (nothing written), None when it is not the owner's. Its
    `last_active_at` moves to `now` only once `ACTIVE_EVERY` seconds have passed since
    it last moved, so a store searched several times a second is written once a minute:
    one conditional UPDATE that finds it usable and due, else one read of its expiry."""
    t = vector_stores
    mine = (t.c.id == vector_store_id, t.c.owner_id == owner)
    expires_at = t.c.last_active_at + t.c.expires_after_days * DAY
    with repo.engine.begin() as conn:
        moved = conn.execute(
            update(t)
            .where(
                *mine,
                t.c.last_active_at <= now - ACTIVE_EVERY,
                or_(t.c.expires_after_days.is_(None), expires_at > now),
            )
            .values(last_active_at=now)
        )
        if moved.rowcount > 0:
            return True
        row = conn.execute(select(*_EXPIRY_COLUMNS).where(*mine)).first()
    if row is None:
        return None
    expires_at = store_expires_at(row.last_active_at, row.expires_after_days)
    return expires_at is None or expires_at > now


def delete_vector_store(repo: Repository, owner: str, vector_store_id: str) -> bool:
    index = index_for(repo)
    with repo.engine.begin() as conn:
        if index is not None:
            index.delete_vector_store(conn, owner, vector_store_id)
        delete_owned(conn, vector_store_files, owner, vector_store_id=vector_store_id)
        forget_list(conn, vector_store_files, vector_store_id, owner)
        delete_owned(conn, vector_store_file_batches, owner, vector_store_id=vector_store_id)
        t = vector_stores
        return delete_listed(conn, t, t.c.owner_id, owner, owner, t.c.id == vector_store_id) > 0


def _counts(conn: Connection, owner: str, vector_store_id: str) -> tuple[FileCounts, int]:
    t = vector_store_files
    rows = conn.execute(
        select(t.c.status, func.count())
        .where(
            t.c.vector_store_id == vector_store_id,
            t.c.owner_id == owner,
        )
        .group_by(t.c.status)
    ).all()
    completed = (
        conn.execute(
            select(files.c.body)
            .join(t, (t.c.id == files.c.id) & (t.c.owner_id == files.c.owner_id))
            .where(
                t.c.vector_store_id == vector_store_id,
                t.c.owner_id == owner,
                t.c.status == "completed",
            )
        )
        .scalars()
        .all()
    )
    return FileCounts(**{status: n for status, n in rows}), sum(b["bytes"] for b in completed)


# -- vector store files ------------------------------------------------------------------


def add_store_files(
    repo: Repository, owner: str, vector_store_id: str, store_files: list[dict]
) -> list[dict] | None:
    """Add files (bodies with status in_progress) to a store: each as the store now holds
    it (see `_put_store_files`), or None if the store is not this owner's."""
    with repo.engine.begin() as conn:
        if not _owns_store(conn, owner, vector_store_id):
            return None
        return _put_store_files(conn, index_for(repo), owner, vector_store_id, store_files)


def update_store_file(
    repo: Repository, owner: str, vector_store_id: str, file_id: str, attributes: dict
) -> dict | None:
    """Replace a store file's attributes, on its row and its indexed chunks (a file still
    being indexed gets them when its chunks are written); None if it is not in the store."""
    t = vector_store_files
    where = (t.c.vector_store_id == vector_store_id, t.c.id == file_id, t.c.owner_id == owner)
    with repo.engine.begin() as conn:
        body = conn.execute(select(t.c.body).where(*where)).scalar()
        if body is None:
            return None
        body = {**body, "attributes": attributes}
        conn.execute(update(t).where(*where).values(body=body))
        _index(repo).set_attributes(conn, owner, vector_store_id, file_id, attributes)
    return body


def get_store_file(repo: Repository, owner: str, vector_store_id: str, file_id: str) -> dict | None:
    with repo.engine.connect() as conn:
        return conn.execute(
            select(vector_store_files.c.body).where(
                vector_store_files.c.vector_store_id == vector_store_id,
                vector_store_files.c.id == file_id,
                vector_store_files.c.owner_id == owner,
            )
        ).scalar()


def list_store_files(
    repo: Repository, owner: str, vector_store_id: str, page: Page, status: str | None
) -> ItemPage | None:
    with repo.engine.connect() as conn:
        if not _owns_store(conn, owner, vector_store_id):
            return None
        t = vector_store_files
        only = [] if status is None else [t.c.status == status]
        return _page(conn, t, t.c.vector_store_id, vector_store_id, owner, page, only=only)


def delete_store_file(repo: Repository, owner: str, vector_store_id: str, file_id: str) -> bool:
    with repo.engine.begin() as conn:
        return _remove_store_file(conn, index_for(repo), owner, vector_store_id, file_id)


def finish_store_file(
    repo: Repository,
    owner: str,
    vector_store_id: str,
    file_id: str,
    chunks: list[ChunkRecord] | None,
    last_error: dict | None,
    ingested: dict | None = None,
) -> bool:
    """Record ingestion's outcome: the chunks and status completed, or status failed with
    `last_error`. False (and nothing written) if the file left the store meanwhile, or was
    added again with another chunking than the one `ingested` (the body ingestion read)
    had: that row's own ingestion writes its outcome. The chunks take the row's
    attributes as they are now, which an update or a new add may have changed."""
    t = vector_store_files
    with repo.engine.begin() as conn:
        body = conn.execute(
            select(t.c.body).where(
                t.c.vector_store_id == vector_store_id,
                t.c.id == file_id,
                t.c.owner_id == owner,
                t.c.status == "in_progress",
            )
        ).scalar()
        if body is None:
            return False
        if ingested is not None and body["chunking_strategy"] != ingested["chunking_strategy"]:
            return False
        status = "failed" if last_error is not None else "completed"
        if chunks:
            chunks = [replace(c, attributes=body["attributes"]) for c in chunks]
            _index(repo).add(conn, owner, vector_store_id, chunks)
        conn.execute(
            update(t)
            .where(
                t.c.vector_store_id == vector_store_id,
                t.c.id == file_id,
                t.c.owner_id == owner,
            )
            .values(status=status, body={**body, "status": status, "last_error": last_error})
        )
    return True


def unfinished_store_files(repo: Repository) -> list[tuple[str, str, str]]:
    """(owner, vector store id, file id) of every file still in_progress: start-up
    maintenance, for ingestion a stop or crash cut off."""
    t = vector_store_files
    with repo.engine.connect() as conn:
        rows = conn.execute(
            select(t.c.owner_id, t.c.vector_store_id, t.c.id)
            .where(t.c.status == "in_progress")
            .order_by(t.c.seq)
        ).all()
    return [(r.owner_id, r.vector_store_id, r.id) for r in rows]


# -- file batches ------------------------------------------------------------------------


def add_file_batch(
    repo: Repository, owner: str, vector_store_id: str, body: dict, store_files: list[dict]
) -> list[dict] | None:
    """Record a batch and add its files: each as the store now holds it (see
    `_put_store_files`), or None if the store is not this owner's."""
    with repo.engine.begin() as conn:
        if not _owns_store(conn, owner, vector_store_id):
            return None
        conn.execute(
            insert(vector_store_file_batches).values(
                id=body["id"],
                vector_store_id=vector_store_id,
                owner_id=owner,
                cancelled=False,
                body=body,
            )
        )
        return _put_store_files(
            conn, index_for(repo), owner, vector_store_id, store_files, body["id"]
        )


def get_file_batch(
    repo: Repository, owner: str, vector_store_id: str, batch_id: str
) -> tuple[dict, FileCounts, bool] | None:
    """The stored body, its files' counts by status, and whether it was cancelled."""
    b = vector_store_file_batches
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(b.c.body, b.c.cancelled).where(
                b.c.id == batch_id, b.c.vector_store_id == vector_store_id, b.c.owner_id == owner
            )
        ).first()
        if row is None:
            return None
        t = vector_store_files
        counts = conn.execute(
            select(t.c.status, func.count())
            .where(t.c.batch_id == batch_id, t.c.owner_id == owner)
            .group_by(t.c.status)
        ).all()
    return row.body, FileCounts(**{status: n for status, n in counts}), row.cancelled


def cancel_file_batch(
    repo: Repository, owner: str, vector_store_id: str, batch_id: str
) -> list[str] | None:
    """Mark the batch cancelled and its files still in progress `cancelled` (ingestion
    then writes nothing for them); the ids of those files, or None if no such batch. A
    batch whose files have all ended has nothing to cancel: it keeps its status."""
    b, t = vector_store_file_batches, vector_store_files
    batch = (b.c.id == batch_id, b.c.vector_store_id == vector_store_id, b.c.owner_id == owner)
    with repo.engine.begin() as conn:
        if conn.execute(select(b.c.id).where(*batch)).first() is None:
            return None
        rows = conn.execute(
            select(t.c.id, t.c.body).where(
                t.c.batch_id == batch_id, t.c.owner_id == owner, t.c.status == "in_progress"
            )
        ).all()
        if rows:
            conn.execute(update(b).where(*batch).values(cancelled=True))
        for row in rows:
            conn.execute(
                update(t)
                .where(
                    t.c.vector_store_id == vector_store_id, t.c.id == row.id, t.c.owner_id == owner
                )
                .values(status="cancelled", body={**row.body, "status": "cancelled"})
            )
    return [row.id for row in rows]


def list_batch_files(
    repo: Repository,
    owner: str,
    vector_store_id: str,
    batch_id: str,
    page: Page,
    status: str | None,
) -> ItemPage | None:
    b, t = vector_store_file_batches, vector_store_files
    with repo.engine.connect() as conn:
        if (
            conn.execute(
                select(b.c.id).where(
                    b.c.id == batch_id,
                    b.c.vector_store_id == vector_store_id,
                    b.c.owner_id == owner,
                )
            ).first()
            is None
        ):
            return None
        only = [t.c.batch_id == batch_id] + ([] if status is None else [t.c.status == status])
        return _page(conn, t, t.c.vector_store_id, vector_store_id, owner, page, only=only)


def _owns_store(conn: Connection, owner: str, vector_store_id: str) -> bool:
    return (
        conn.execute(
            select(vector_stores.c.id).where(
                vector_stores.c.id == vector_store_id, vector_stores.c.owner_id == owner
            )
        ).first()
        is not None
    )


def search(repo: Repository, owner: str, request: SearchRequest, now: int) -> list[Hit]:
    """The index's hits, less those of files expired at `now` (their chunks stay until
    the sweep deletes the file, and no read may show them meanwhile)."""
    with repo.engine.connect() as conn:
        hits = _index(repo).search(conn, owner, request)
        found = {hit.file_id for hit in hits}
        if not found:
            return hits
        expired = set(
            conn.execute(
                select(files.c.id).where(
                    files.c.id.in_(found), files.c.owner_id == owner, ~live_files(now)
                )
            ).scalars()
        )
    return [hit for hit in hits if hit.file_id not in expired]


def _put_store_files(
    conn: Connection,
    index: ChunkTableIndex | None,
    owner: str,
    vector_store_id: str,
    store_files: list[dict],
    batch_id: str | None = None,
) -> list[dict]:
    """Add files (bodies with status in_progress) to a store, each as the store then holds
    it. A file already `completed` there with the same chunking strategy keeps its chunks,
    status and `created_at` (indexing it again would make it unsearchable until done, and
    a cancelled batch would leave it so): it takes the add's attributes, on its chunks too,
    and joins the batch. Any other file already there (in progress, failed, cancelled,
    or chunked otherwise) is replaced, its chunks gone, and queued again from scratch."""
    t = vector_store_files
    held_now, added = [], []
    for body in store_files:
        where = (
            t.c.vector_store_id == vector_store_id,
            t.c.id == body["id"],
            t.c.owner_id == owner,
        )
        held = conn.execute(select(t.c.body).where(*where)).scalar()
        if (
            index is not None
            and held is not None
            and held["status"] == "completed"
            and held["chunking_strategy"] == body["chunking_strategy"]
        ):
            held = {**held, "attributes": body["attributes"]}
            conn.execute(update(t).where(*where).values(body=held, batch_id=batch_id))
            index.set_attributes(conn, owner, vector_store_id, body["id"], body["attributes"])
            held_now.append(held)
        else:
            _remove_store_file(conn, index, owner, vector_store_id, body["id"])
            added.append(body)
            held_now.append(body)
    _insert_store_files(conn, owner, vector_store_id, added, batch_id)
    return held_now


def _insert_store_files(
    conn: Connection,
    owner: str,
    vector_store_id: str,
    store_files: list[dict],
    batch_id: str | None = None,
) -> None:
    if store_files:
        conn.execute(
            insert(vector_store_files),
            [
                {
                    "id": body["id"],
                    "vector_store_id": vector_store_id,
                    "owner_id": owner,
                    "status": body["status"],
                    "body": body,
                    "batch_id": batch_id,
                }
                for body in store_files
            ],
        )


def _remove_store_file(
    conn: Connection, index: ChunkTableIndex | None, owner: str, vector_store_id: str, file_id: str
) -> bool:
    if index is not None:
        index.delete_file(conn, owner, vector_store_id, file_id)
    t = vector_store_files
    return (
        delete_listed(conn, t, t.c.vector_store_id, vector_store_id, owner, t.c.id == file_id) > 0
    )
