"""A turn's stream of events, for its readers: `EventLog`.

A foreground response's events have one reader, the request that streams them, and are
dropped as it takes them. A background response's are kept whole, in memory, while it
runs and for a while after (`orchestrator/background.py`): any number of readers may
follow them from any `sequence_number` (`GET /v1/responses/{id}?stream=true&starting_after=N`),
and a reader that goes away does not touch the turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from orchestrator.events import Event


class EventLog:
    """The events of one turn, in order, and whether the turn has ended."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep  # False: one reader, which takes (and drops) each event
        self._events: list[Event] = []
        self._dropped = 0  # events taken by the one reader and dropped
        self._changed = asyncio.Event()
        self.closed_at: float | None = None  # time.monotonic() when the turn ended
        # A kept log's events' size, as the JSON they stream as: what bounds the logs kept
        # (`BackgroundStreams`), as an event's count would not: a delta with its top
        # logprobs, or a final event holding the whole answer, is many times a plain one.
        self.size = 0

    def put(self, event: Event) -> None:
        self._events.append(event)
        if self.keep:
            # default=str: an estimate, which must never fail the turn
            text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)
            self.size += len(text)
        self._wake()

    def close(self) -> None:
        """No event follows: readers end once they have taken the last one."""
        self.closed_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[Event]:
        """The events whose sequence_number is above `after`, those already put and then
        those to come, until the turn ends."""
        position = 0
        while True:
            changed = self._changed
            while position < self._dropped + len(self._events):
                event = self._events[position - self._dropped]
                position += 1
                if not self.keep:
                    del self._events[0]
                    self._dropped += 1
                if event.get("sequence_number", -1) > after:
                    yield event
            if self.closed_at is not None:
                return
            await changed.wait()
