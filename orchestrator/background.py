"""The event logs of background responses, kept for clients resuming their streams.

A background response (`background: true`) runs on its own, apart from the request that
created it; its events are kept in memory (`EventLog` with `keep`) while it runs and for
`RETAIN_S` after it ends, the finished ones holding at most `MOST_FINISHED_CHARS` of
events (as the JSON they stream as) all told, those that ended first dropped first (a
delta is an event, so a long answer holds thousands, each some hundreds of bytes, or
kilobytes with its top logprobs), so `GET /v1/responses/{id}?stream=true&starting_after=N`
can replay them and follow the rest. They are not stored: after a restart, or on another
server sharing the database, the response reads from the store but its events cannot be
streamed again.
"""

from __future__ import annotations

import time

from orchestrator.event_log import EventLog

RETAIN_S = 600.0  # how long a finished background response's events are kept
# The most characters of events (as JSON) kept of finished background responses, all
# told: their dictionaries take two to six times that in memory, so some tens of megabytes.
MOST_FINISHED_CHARS = 10_000_000


class BackgroundStreams:
    """The event logs of this server's background responses, by response id."""

    def __init__(self, retain_s: float = RETAIN_S, most_chars: int = MOST_FINISHED_CHARS) -> None:
        self.retain_s = retain_s
        self.most_chars = most_chars
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
        """Drop the logs of responses that ended over `retain_s` ago, then those that
        ended first until those left hold at most `most_chars`; those of running
        responses stay. By end, not start: a long response that just ended is the one a
        client is likeliest to resume."""
        now = time.monotonic()
        finished = []
        for response_id, (_, log) in list(self._logs.items()):
            if log.closed_at is None:
                continue
            if now - log.closed_at > self.retain_s:
                del self._logs[response_id]
            else:
                finished.append((log.closed_at, response_id, log.size))
        kept = sum(size for _, _, size in finished)
        for _, response_id, size in sorted(finished):  # ended first, first
            if kept <= self.most_chars:
                break
            del self._logs[response_id]
            kept -= size
