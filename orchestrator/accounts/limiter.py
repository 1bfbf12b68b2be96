"""Per-user rate limits: requests per minute and tokens per minute, as token buckets.

Each limit is a bucket holding up to a minute's allowance and refilling continuously
(rpm / 60 a second), so a user may burst up to the limit and then proceeds at the
limit's pace. The buckets live in this process's memory: a limit is per server, which is
what it protects. A request takes one request and, once its prompt is tokenized, its
prompt plus output budget in tokens; what it did not use goes back when it ends, and one
refused for its tokens gives its request back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.errors import RateLimitError


@dataclass
class Bucket:
    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def resize(self, capacity: float) -> None:
        """A changed limit applies at once, keeping what was spent; but a lowered limit
        puts no one in debt (what was spent beyond it leaves nothing, not a wait of
        minutes: a limit per minute is back to its pace a minute later). A debt the
        bucket already had (a tool loop's later turns) stays."""
        kept = self.level + capacity - self.capacity
        self.level = min(capacity, max(kept, min(self.level, 0.0)))
        self.capacity = capacity

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (infinite if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class UserBuckets:
    requests: Bucket | None = None
    tokens: Bucket | None = None


@dataclass
class RateLimiter:
    clock: Callable[[], float] = time.monotonic
    users: dict[str, UserBuckets] = field(default_factory=dict)

    def _buckets(self, user_id: str, rpm: int | None, tpm: int | None) -> UserBuckets:
        now = self.clock()
        buckets = self.users.setdefault(user_id, UserBuckets())
        buckets.requests = _sized(buckets.requests, rpm, now)
        buckets.tokens = _sized(buckets.tokens, tpm, now)
        return buckets

    def take_request(self, user_id: str, rpm: int | None, tpm: int | None) -> None:
        """Take one request from the user's rpm bucket (RateLimitError if empty)."""
        bucket = self._buckets(user_id, rpm, tpm).requests
        if bucket is not None:
            _take(bucket, 1, "requests", rpm, self.headers(user_id))

    def take_tokens(
        self, user_id: str, rpm: int | None, tpm: int | None, amount: int, admitted: bool = False
    ) -> None:
        """Take a request's first `amount` tokens from the user's tpm bucket
        (RateLimitError if short). A request refused here never ran, so it gives back the
        request it took from the rpm bucket (`take_request`): a client retrying a request
        too large for the minute's tokens would otherwise also spend its requests.
        `admitted`: for a request already let in (a later generation of a turn), which the
        limit never cuts short: the tokens are taken even into debt, which the user's
        next requests wait out."""
        buckets = self._buckets(user_id, rpm, tpm)
        bucket = buckets.tokens
        if bucket is None:
            return
        if admitted:
            bucket.level -= amount
            return
        if bucket.level < amount and buckets.requests is not None:
            requests = buckets.requests
            requests.level = min(requests.capacity, requests.level + 1)
        _take(bucket, amount, "tokens", tpm, self.headers(user_id))

    def refund_tokens(self, user_id: str, amount: int) -> None:
        buckets = self.users.get(user_id)
        if buckets is not None and buckets.tokens is not None and amount > 0:
            buckets.tokens.refill(self.clock())
            buckets.tokens.level = min(buckets.tokens.capacity, buckets.tokens.level + amount)

    def headers(self, user_id: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the user's limits (none when unlimited)."""
        buckets = self.users.get(user_id)
        headers: dict[str, str] = {}
        if buckets is None:
            return headers
        now = self.clock()
        for name, bucket in (("requests", buckets.requests), ("tokens", buckets.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            headers[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            headers[f"x-ratelimit-reset-{name}"] = _duration(bucket.until_full())
        return headers


def _sized(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(float(limit), float(limit), now)
    bucket.refill(now)
    if bucket.capacity != limit:
        bucket.resize(float(limit))
    return bucket


def _take(
    bucket: Bucket, amount: int, name: str, limit: int | None, headers: dict[str, str]
) -> None:
    if bucket.level >= amount:
        bucket.level -= amount
        return
    wait = bucket.wait_for(amount)
    if math.isinf(wait):
        raise RateLimitError(
            f"this request needs {amount} {name}, more than the limit of {limit} {name} per "
            "minute allows at once; lower the output token limit or the prompt",
            None,
            headers,
            name,
        )
    raise RateLimitError(
        f"rate limit reached: {limit} {name} per minute; retry in {_duration(wait)}",
        wait,
        headers,
        name,
    )
