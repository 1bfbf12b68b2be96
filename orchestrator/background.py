"""The event logs of background responses, kept for clients resuming their streams.

A background response (`background: true`) runs on its own, apart from the request that
created it; its events are kept in memory (`EventLog` with `keep`) while it runs and for
`RETAIN_S` after it ends, at most `MOST_FINISHED` finished ones (the oldest dropped
first), so `GET /v1/responses/{id}?stream=true&starting_after=N` can replay them and
follow the rest. They are not stored: after a restart, or on another server sharing the
database, the response reads from the store but its events cannot be streamed again.
"""

from __future__ import annotations

import time

from orchestrator.event_log import EventLog

RETAIN_S = 600.0  # how long a finished background response's events are kept
MOST_FINISHED = 256  # the most finished background responses whose events are kept


class BackgroundStreams:
    """The event logs of this server's background responses, by response id."""

    def __init__(self, retain_s: float = RETAIN_S, most_finished: int = MOST_FINISHED) -> None:
        self.retain_s = retain_s
        self.most_finished = most_finished
        self._logs: dict[str, tuple[str, EventLog]] = {}  # id -> (owner, log), oldest first

    def add(self, owner: str, response_id: str, log: EventLog) -> None:
        self._prune()
        self._logs[response_id] = (owner, log)

    def discard(self, response_id: str) -> None:
        """Forget a response's log (it is deleted: its events are gone with it)."""
        self._logs.pop(response_id, None)

    def get(self, owner: str, response_id: str) -> EventLog | None:
        """The owner's response's log, if it is still kept."""
        self._prune()
        found = self._logs.get(response_id)
        return found[1] if found is not None and found[0] == owner else None

    def _prune(self) -> None:
        """Drop the logs of responses that ended over `retain_s` ago, then the oldest
        finished ones past `most_finished`; those of running responses stay."""
        now = time.monotonic()
        finished = []
        for response_id, (_, log) in list(self._logs.items()):
            if log.closed_at is None:
                continue
            if now - log.closed_at > self.retain_s:
                del self._logs[response_id]
            else:
                finished.append(response_id)
        for response_id in finished[: max(0, len(finished) - self.most_finished)]:
            del self._logs[response_id]
