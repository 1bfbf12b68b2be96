"""One turn at a time in a conversation, as OpenAI runs them: two turns at once would each
answer on a history without the other's, then both be appended as if in sequence; an item
appended while a turn runs would land before that turn's own input, in a history the
model never saw.

A turn of this server holds its conversation from before its history is read (`claim`)
until it ends (`release`): in memory (checked and taken with no await between, so two
requests cannot both pass), and on PostgreSQL also with an advisory lock on this server's
own session (`store/servers.py`), so two servers sharing the database cannot both start a
turn there; a server that crashes frees it with its session. A turn of another server also
shows as a response `in_progress`, begun in the last CONVERSATION_LOCK_SECONDS (older ones
are taken to be a crashed server's; a SQLite database's are marked incomplete at start-up),
which holds the conversation until a server recovers the crashed one's turns.
Locks are the owner's: another user naming the conversation is told it does not exist,
never that it is busy.

Appending items (`holding`) is a short store write, so appends wait their turn behind each
other, as OpenAI serializes them: on this server in line (first come, first served), behind
another server's by trying again, for at most APPEND_WAIT_SECONDS in all. A turn is not
waited for (it may run for minutes): an append while one runs is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from orchestrator.errors import InvalidRequestError
from orchestrator.slots import KeyedSlots, SlotWaitTooLong
from orchestrator.store import Repository, Store, servers

CONVERSATION_LOCK_SECONDS = 600
APPEND_WAIT_SECONDS = 10.0  # the longest an append waits behind others
APPEND_RETRY_SECONDS = 0.05  # between tries to take it from another server's append
log = logging.getLogger("tokenmill")


def conversation_locked(param: str = "conversation") -> InvalidRequestError:
    return InvalidRequestError(
        "Another process is currently operating on this conversation. "
        "Please retry in a few seconds.",
        param=param,
        code="conversation_locked",
    )


class ConversationLock:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: set[tuple[str, str]] = set()  # (owner, conversation id)
        # this server's appends to each conversation, in line
        self.appends: KeyedSlots[tuple[str, str]] = KeyedSlots(1)

    async def claim(self, owner: str, conversation_id: str, param: str = "conversation") -> None:
        """Hold the conversation for a turn of this server (`conversation_locked` if a turn
        or an append of this server or another holds it already)."""
        if not await self._take(owner, conversation_id):
            raise conversation_locked(param)

    async def _take(self, owner: str, conversation_id: str) -> bool:
        """Hold the conversation if nothing holds it (False, holding nothing, otherwise)."""
        if (owner, conversation_id) in self.held:
            return False
        self.held.add((owner, conversation_id))
        server_lock = self.store.server_lock
        if server_lock is None:
            return True
        try:
            taken = await self.store.call(
                servers.hold_conversation, server_lock, owner, conversation_id
            )
        except BaseException:
            await self.release(owner, conversation_id)  # taken all the same when cancelled
            raise
        if not taken:
            self.held.discard((owner, conversation_id))
        return taken

    async def release(self, owner: str, conversation_id: str) -> None:
        """Let the conversation go. Never raises: a turn ends whatever happens here (an
        advisory lock left held goes with this server's session)."""
        server_lock = self.store.server_lock
        try:
            if server_lock is not None:
                await self.store.call(
                    servers.release_conversation, server_lock, owner, conversation_id
                )
        except Exception as exc:
            log.warning("conversation %s could not be let go: %r", conversation_id, exc)
        finally:
            self.held.discard((owner, conversation_id))

    async def check_others(self, owner: str, conversation_id: str, param: str) -> None:
        """`conversation_locked` while another server's turn runs in the conversation."""
        since = int(time.time()) - CONVERSATION_LOCK_SECONDS
        if await self.store.call(Repository.conversation_busy, owner, conversation_id, since):
            raise conversation_locked(param)

    @contextlib.asynccontextmanager
    async def holding(self, owner: str, conversation_id: str, param: str) -> AsyncIterator[None]:
        """Hold the conversation while items are appended to it, after the appends before
        (`conversation_locked` while a turn runs there, or past APPEND_WAIT_SECONDS in
        line). Held through the write, not only checked before it: a turn of another
        server starting between the check and the write would read a history without the
        items, which would then land during it."""
        deadline = time.monotonic() + APPEND_WAIT_SECONDS  # both lines' waits together
        try:
            async with self.appends.hold((owner, conversation_id), APPEND_WAIT_SECONDS):
                await self._claim_for_append(owner, conversation_id, param, deadline)
                try:
                    await self.check_others(owner, conversation_id, param)
                    yield
                finally:
                    await self.release(owner, conversation_id)
        except SlotWaitTooLong:  # not first in this server's line in time
            raise conversation_locked(param) from None

    async def _claim_for_append(
        self, owner: str, conversation_id: str, param: str, deadline: float
    ) -> None:
        """Hold the conversation for an append first in this server's line: at once unless
        another server holds it; then, tried again while no turn shows in the database
        (another server's append, or a turn about to show), until `deadline`."""
        while not await self._take(owner, conversation_id):
            await self.check_others(owner, conversation_id, param)
            if (owner, conversation_id) in self.held or time.monotonic() >= deadline:
                raise conversation_locked(param)  # this server's turn, or waited enough
            await asyncio.sleep(APPEND_RETRY_SECONDS)
