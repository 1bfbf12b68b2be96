"""Claims that hold across servers sharing one PostgreSQL database: session-level advisory
locks (`pg_try_advisory_lock`), each on a connection of its own for as long as it is held.
A server that stops or crashes loses its sessions and with them its claims. Two uses:

- Ingestion: a server claims a vector store file for the whole of its ingestion, so a
  server starting later can queue every file still `in_progress` and ingest exactly those
  that nobody holds: a file is never stuck, and never ingested twice at once.
- Recovery (`servers.py`): a server takes a departed server's lock while it ends that
  server's turns, so two servers never recover the same one.

SQLite needs no claims: its database belongs to one server. Claims are taken and released
on the store's worker thread (`Store.call`), like every other statement.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection, func, select

from orchestrator.store.repository import Repository


def advisory_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for what `parts` name (the first, its kind)."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# The schema's key: migrations, and the PostgreSQL retrieval index's creation, run under it.
MIGRATION_LOCK = advisory_key("migrate")


def claim_key(owner: str, vector_store_id: str, file_id: str) -> int:
    """The key of one file of one store."""
    return advisory_key("ingest", owner, vector_store_id, file_id)


class AdvisoryClaims:
    def __init__(self) -> None:
        self._held: dict[int, Connection] = {}

    def claim(self, repo: Repository, key: int) -> bool:
        """Whether this server now holds `key` (False: another server does)."""
        if repo.engine.dialect.name != "postgresql":
            return True
        conn = repo.engine.connect()
        try:
            taken = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
            conn.commit()  # the lock is the session's: no transaction stays open
        except BaseException:
            conn.close()
            raise
        if not taken:
            conn.close()
            return False
        self._held[key] = conn
        return True

    def release(self, repo: Repository, key: int) -> None:
        conn = self._held.pop(key, None)
        if conn is None:
            return
        try:
            conn.execute(select(func.pg_advisory_unlock(key)))
            conn.commit()
        except BaseException:
            conn.invalidate()  # never hand a session that may still hold it back to the pool
            raise
        conn.close()
