"""Bounds on work that runs beside the requests: how many files are read at once, in all
and per owner, and one ingestion of a given file at a time."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Files read at once by this server (a vector store's ingestion, an input file's
# extraction), and by one owner. Extraction and chunking run on worker threads and
# embedding on the embedder's one thread, so a few files at once keep both busy; more would
# only hold more files in memory.
INGEST_SLOTS = 4
INGEST_SLOTS_PER_OWNER = 2


class SlotWaitTooLong(Exception):
    """A slot did not come within the wait `KeyedSlots.hold` was given."""


class KeyedSlots(Generic[K]):
    """At most `per_key` holders at once for each key, the others waiting in turn (FIFO);
    a key's semaphore is forgotten once nobody holds or awaits it."""

    def __init__(self, per_key: int) -> None:
        self._per_key = per_key
        self._semaphores: dict[K, asyncio.Semaphore] = {}
        self._users: Counter[K] = Counter()  # holding or awaiting each key's semaphore

    @asynccontextmanager
    async def hold(self, key: K, wait_s: float | None = None) -> AsyncIterator[None]:
        """A slot of `key`'s, for the body of the `async with`; SlotWaitTooLong when none
        came within `wait_s` seconds (None: as long as it takes)."""
        semaphore = self._semaphores.setdefault(key, asyncio.Semaphore(self._per_key))
        self._users[key] += 1
        try:
            try:
                async with asyncio.timeout(wait_s):
                    await semaphore.acquire()
            except TimeoutError:
                raise SlotWaitTooLong from None
            try:
                yield
            finally:
                semaphore.release()
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # no semaphore kept for every past key
                del self._users[key], self._semaphores[key]


class IngestionSlots:
    """At most `total` files read at once, at most `per_owner` of them one owner's.

    A file waits for a slot of its owner's first, then for one of the server's (both
    FIFO). So each owner has at most `per_owner` files waiting for or holding a server
    slot, and the server's queue takes owners in turn: another owner's file waits for a
    few files to finish, not for all 2,000 of a batch queued before it."""

    def __init__(self, total: int = INGEST_SLOTS, per_owner: int = INGEST_SLOTS_PER_OWNER) -> None:
        self._total = asyncio.Semaphore(total)
        self._owners: KeyedSlots[str] = KeyedSlots(per_owner)

    @asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        """A slot for one of `owner`'s files, for the body of the `async with`."""
        async with self._owners.hold(owner), self._total:
            yield
