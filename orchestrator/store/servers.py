"""Servers sharing one PostgreSQL database: which one runs a turn, and ending the turns of
one that crashed.

Each server that opens a PostgreSQL store picks a random id and holds, for its whole life,
a session-level advisory lock on that id's key, on a connection of its own (`ServerLock`).
The responses, quota reservations and usage checkpoints it writes carry the id
(`Repository.server_id`). A server that crashes loses its session and with it the lock,
as a claimant of an ingestion does (`advisory_claims.py`). `recover_departed` (at start-up,
then every `RECOVERY_SECONDS`, on the store's worker thread) takes the lock of each other
server whose rows are still in flight: taken, that server is gone, and its rows get the
maintenance SQLite's start-up gives every row: its responses end `incomplete`, its usage
checkpoints are settled and its quota reservations released. The lock is held meanwhile,
so two servers never recover the same one at once. Rows without a server id (written
before migration 0010, or on SQLite) are never touched here. A live server whose lock
session was cut (the database restarted, the network dropped it) is taken for gone until
its next sweep takes the lock again: its requests then settle twice, once here from their
checkpoints and once as they end, which `accounts._write_usage` counts once.

The same session holds the conversations this server's turns run in
(`hold_conversation`, `conversation_lock.py`), so a crash frees them too.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Connection, Engine, func, select, union
from sqlalchemy.exc import DBAPIError

from orchestrator.store.accounts import release_reservations, settle_checkpoints
from orchestrator.store.advisory_claims import AdvisoryClaims, advisory_key
from orchestrator.store.repository import UNFINISHED, Repository
from orchestrator.store.tables import quota_reservations, responses, usage_checkpoints

log = logging.getLogger("tokenmill")

RECOVERY_SECONDS = 60.0


def server_key(server_id: str) -> int:
    """The advisory-lock key a live server `server_id` holds."""
    return advisory_key("server", server_id)


class ServerLock:
    """This server's id, and its advisory lock held on a connection of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.server_id = f"srv_{uuid.uuid4().hex}"
        self._conn: Connection | None = None
        self.hold()

    def hold(self) -> None:
        """Hold the lock: take it on a new session when the one holding it was lost (the
        database restarted, the connection was cut), lest another server take this one
        for gone."""
        if self._conn is not None:
            try:
                self._conn.execute(select(1))
                self._conn.commit()
                return
            except DBAPIError:
                log.warning("the database session holding this server's lock was lost")
                self.close()
        conn = self.engine.connect()
        try:
            conn.execute(select(func.pg_advisory_lock(server_key(self.server_id))))
            conn.commit()  # the lock is the session's: no transaction stays open
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        self._conn = conn

    def try_hold(self, key: int) -> bool:
        """Take the advisory lock `key` on this server's session too, if no other session
        holds it (False then). Held until `let_go`, or until the session ends: a server that
        crashes frees it. Locks of one session stack: take a key once at a time."""
        self.hold()
        assert self._conn is not None
        taken = bool(self._conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
        self._conn.commit()
        return taken

    def let_go(self, key: int) -> None:
        """Release a lock `try_hold` took. A session that no longer answers has lost it
        already, and this server's own lock with it: the next `hold` takes that again."""
        if self._conn is None:
            return
        try:
            self._conn.execute(select(func.pg_advisory_unlock(key)))
            self._conn.commit()
        except DBAPIError:
            log.warning("the database session holding this server's locks was lost")
            self.close()

    def close(self) -> None:
        """Let the lock go, with its session (the connection is not pooled again)."""
        if self._conn is not None:
            self._conn.invalidate()
            self._conn.close()
            self._conn = None


def conversation_key(owner: str, conversation_id: str) -> int:
    """The advisory-lock key a server holds while its turn runs in that conversation."""
    return advisory_key("conversation", owner, conversation_id)


def hold_conversation(_repo: Repository, own: ServerLock, owner: str, conversation_id: str) -> bool:
    """Hold the conversation for a turn of this server (False: another server's turn holds
    it). On the store's worker thread, as every use of `own`'s session is."""
    return own.try_hold(conversation_key(owner, conversation_id))


def release_conversation(
    _repo: Repository, own: ServerLock, owner: str, conversation_id: str
) -> None:
    own.let_go(conversation_key(owner, conversation_id))


def recover_departed(repo: Repository, own: ServerLock) -> list[str]:
    """Hold this server's lock (`own`), then end the turns in flight of every other server
    that is gone; returns the ids of those servers."""
    own.hold()
    claims = AdvisoryClaims()
    recovered = []
    for server_id in _servers_in_flight(repo, own.server_id):
        key = server_key(server_id)
        if not claims.claim(repo, key):
            continue  # alive, or another server is recovering it
        try:
            ended = repo.interrupt_unfinished(server_id)
            settled = settle_checkpoints(repo, server_id)
            released = release_reservations(repo, server_id)
        finally:
            claims.release(repo, key)
        log.warning(
            "server %s is gone: %d of its responses ended incomplete, %d usage checkpoints "
            "settled, %d quota reservations released",
            server_id,
            ended,
            settled,
            released,
        )
        recovered.append(server_id)
    return recovered


def _servers_in_flight(repo: Repository, own_id: str) -> list[str]:
    """The ids of the other servers with a response unfinished, a usage checkpoint or a
    quota reservation."""
    found = union(
        select(responses.c.server_id).where(responses.c.status.in_(UNFINISHED)),
        select(usage_checkpoints.c.server_id),
        select(quota_reservations.c.server_id),
    ).subquery()
    with repo.engine.connect() as conn:
        return list(
            conn.execute(
                select(found.c.server_id)
                .where(found.c.server_id.is_not(None), found.c.server_id != own_id)
                .order_by(found.c.server_id)
            ).scalars()
        )
