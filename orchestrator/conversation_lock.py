"""One turn at a time in a conversation, as OpenAI runs them: two turns at once would each
answer on a history without the other's, then both be appended as if in sequence; an item
appended while a turn runs would land before that turn's own input, in a history the
model never saw.

A turn of this server holds its conversation in memory from before its history is read
(`claim`, synchronous, so two requests cannot both pass between the check and the claim)
until it ends (`release`). A turn of another server on the same database shows as a
response `in_progress` there, begun in the last CONVERSATION_LOCK_SECONDS (older ones are
taken to be a crashed server's; a SQLite database's are marked incomplete at start-up).
Locks are the owner's: another user naming the conversation is told it does not exist,
never that it is busy.
"""

from __future__ import annotations

import time

from orchestrator.errors import InvalidRequestError
from orchestrator.store import Repository, Store

CONVERSATION_LOCK_SECONDS = 600


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

    def claim(self, owner: str, conversation_id: str) -> None:
        """Hold the conversation for a turn of this server (`conversation_locked` if one
        holds it already)."""
        if (owner, conversation_id) in self.held:
            raise conversation_locked()
        self.held.add((owner, conversation_id))

    def release(self, owner: str, conversation_id: str) -> None:
        self.held.discard((owner, conversation_id))

    async def check_others(self, owner: str, conversation_id: str, param: str) -> None:
        """`conversation_locked` while another server's turn runs in the conversation."""
        since = int(time.time()) - CONVERSATION_LOCK_SECONDS
        if await self.store.call(Repository.conversation_busy, owner, conversation_id, since):
            raise conversation_locked(param)

    async def check_free(self, owner: str, conversation_id: str, param: str) -> None:
        """`conversation_locked` while any turn runs in the conversation (before appending
        items to it)."""
        if (owner, conversation_id) in self.held:
            raise conversation_locked(param)
        await self.check_others(owner, conversation_id, param)
