"""What a turn reports to the one who started it: tokens as they come (`TokenObserver`,
the server's latency metrics) and their cost (`Budget`, the requester's quota); and the
place a turn waits for before it runs (`Place`, the server's admission).

Both are protocols, so the turn calls whatever the caller hands it (the server's timer and
`orchestrator.accounts.Meter`, or a test's); `NoObserver` and `Unlimited` stand in when
a caller passes none.
"""

from __future__ import annotations

from typing import Protocol


class TokenObserver(Protocol):
    """Latency metrics hook (the server's RequestTimer)."""

    def on_tokens(self, count: int) -> None: ...

    def on_finished(self) -> None: ...


class NoObserver:
    def on_tokens(self, count: int) -> None:
        pass

    def on_finished(self) -> None:
        pass


class Place(Protocol):
    """A response's place in the server's queue (its admission ticket). A background
    turn is `queued` until `wait` returns, and a turn stopped meanwhile cancels the wait,
    which gives the place up; any other response waits for it before its turn starts
    (`ResponseService.create`)."""

    @property
    def queued(self) -> bool: ...

    async def wait(self) -> None: ...


class Budget(Protocol):
    """The requester's token allowance (`orchestrator.accounts.Meter`): each generation
    reserves its prompt plus output budget before it runs (QuotaExceededError or
    RateLimitError when that does not fit; a later generation passes what the earlier
    ones `spent`), the turn checkpoints its usage so far as it runs, and settles once,
    with its usage."""

    async def reserve(self, tokens: int, spent: int | None = None) -> None: ...

    async def checkpoint(
        self, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None: ...

    async def settle(
        self, status: str, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None: ...


class Unlimited:
    async def reserve(self, tokens: int, spent: int | None = None) -> None:
        pass

    async def checkpoint(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        pass

    async def settle(
        self, status: str, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None:
        pass


def output_budget(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, n: int = 1
) -> int:
    """What one generation may cost, reserved against the quota before it starts: its
    prompt once, plus the most each of its `n` sequences may generate (its max_tokens,
    else what the context window leaves)."""
    most = max_model_len - prompt_tokens if max_tokens is None else max_tokens
    return prompt_tokens + n * max(most, 0)
