"""Bounds on work that runs beside the requests: how many files are read at once, in all
and per owner, one ingestion of a given file at a time, and sandbox runs shared among
owners in turn."""

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


class FairSlots:
    """At most `total` holders at once; while owners wait, a freed slot goes to the waiting
    owner who holds the fewest, and among those to the one whose last slot came longest
    ago (an owner holding and awaiting nothing is forgotten: back, it comes first), then
    to its earliest waiter. An owner alone may take every slot, but one who queued many
    runs does not hold the others up: their first run waits for one slot to free, not for
    the whole queue."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._held: Counter[str] = Counter()
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._served: dict[str, int] = {}  # each owner's latest slot, as a grant count
        self._grants = 0

    @asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        """A slot for `owner`, for the body of the `async with`."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._grant(owner)
        else:
            await self._wait(owner)
        try:
            yield
        finally:
            self._release(owner)

    async def _wait(self, owner: str) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (owner, turn)
        self._waiting.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a slot as it was cancelled
                self._release(owner)
            else:
                if entry in self._waiting:  # (a release may have dropped it already)
                    self._waiting.remove(entry)
                self._forget(owner)
            raise

    def _grant(self, owner: str) -> None:
        self._held[owner] += 1
        self._grants += 1
        self._served[owner] = self._grants

    def _release(self, owner: str) -> None:
        """`owner` lets a slot go: to the waiter `FairSlots` says, or free."""
        self._held[owner] -= 1
        if not self._held[owner]:
            del self._held[owner]
        # A waiter cancelled since it queued has not run its own clean-up yet.
        self._waiting = [entry for entry in self._waiting if not entry[1].cancelled()]
        if self._waiting:
            waiter, turn = self._waiting.pop(min(range(len(self._waiting)), key=self._rank))
            self._grant(waiter)
            turn.set_result(None)
        else:
            self._free += 1
        self._forget(owner)

    def _rank(self, i: int) -> tuple[int, int, int]:
        owner = self._waiting[i][0]
        return (self._held[owner], self._served.get(owner, 0), i)

    def _forget(self, owner: str) -> None:
        """Drop what is kept of an owner holding and awaiting nothing."""
        if owner not in self._held and all(o != owner for o, _ in self._waiting):
            self._served.pop(owner, None)
