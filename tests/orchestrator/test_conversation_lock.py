"""Appends' turns at a conversation (`ConversationLock.holding`), against a store whose
conversation another server holds."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator import conversation_lock
from orchestrator.conversation_lock import ConversationLock
from orchestrator.errors import InvalidRequestError
from orchestrator.store import servers


class _HeldElsewhere:
    """A shared database where another server holds every conversation (its append, not
    yet a turn that shows)."""

    server_lock = "this server"

    async def call(self, fn, *args):
        return False if fn is servers.hold_conversation else None


async def _append(lock: ConversationLock, after: float) -> float:
    """Seconds from the append's arrival (`after` seconds from now) to its refusal."""
    await asyncio.sleep(after)
    arrived = time.monotonic()
    with pytest.raises(InvalidRequestError, match="Another process"):
        async with lock.holding("alice", "conv_1", "conversation_id"):
            pytest.fail("appended while another server held the conversation")
    return time.monotonic() - arrived


def test_an_append_waits_at_most_the_append_wait_in_all(monkeypatch):
    """An append behind this server's others, then behind another server's, is refused
    APPEND_WAIT_SECONDS after it arrived, not that long in each line."""
    monkeypatch.setattr(conversation_lock, "APPEND_WAIT_SECONDS", 0.6)
    lock = ConversationLock(_HeldElsewhere())

    async def scenario() -> list[float]:
        return await asyncio.gather(_append(lock, 0), _append(lock, 0.2))

    first, second = asyncio.run(scenario())
    assert 0.55 < first < 0.8
    assert 0.35 < second < 0.8
