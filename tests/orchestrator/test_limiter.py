"""Per-user rate limits: token buckets on a fake clock, and OpenAI's headers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.accounts.identity import Identity
from orchestrator.accounts.limiter import RateLimiter
from orchestrator.accounts.meter import Meter
from orchestrator.accounts.service import Accounts, Reservation
from orchestrator.errors import RateLimitError
from orchestrator.store import StoreUnavailableError
from orchestrator.store import accounts as db
from orchestrator.store.accounts import UserRow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_burst_then_refill_at_the_limits_pace():
    clock = Clock()
    limiter = RateLimiter(clock)
    for _ in range(3):
        limiter.take_request("u", 3, None)
    with pytest.raises(RateLimitError) as refused:
        limiter.take_request("u", 3, None)
    assert refused.value.retry_after == pytest.approx(20.0)  # 3 per minute: one per 20 s
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-limit-requests"] == "3"
    clock.now += 20
    limiter.take_request("u", 3, None)
    limiter.take_request("other", 3, None)  # users have buckets of their own


def test_tokens_per_minute_refuse_what_does_not_fit_and_refund_what_went_unused():
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.take_tokens("u", None, 1000, 800)
    with pytest.raises(RateLimitError) as refused:
        limiter.take_tokens("u", None, 1000, 300)
    assert refused.value.retry_after == pytest.approx(6.0)  # 100 tokens at 1000/60 a second
    limiter.refund_tokens("u", 500)  # the request used 300 of its 800
    limiter.take_tokens("u", None, 1000, 600)
    with pytest.raises(RateLimitError) as never:
        limiter.take_tokens("u", None, 1000, 1001)
    assert never.value.retry_after is None  # larger than the bucket: it can never fit


def test_headers_report_limit_remaining_and_reset_and_follow_a_changed_limit():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.headers("u") == {}
    limiter.take_request("u", 60, 6000)
    limiter.take_tokens("u", 60, 6000, 3000)
    headers = limiter.headers("u")
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "3000",
        "x-ratelimit-reset-tokens": "30s",
    }
    limiter.take_request("u", 120, None)  # raised by the operator; the tpm limit lifted
    headers = limiter.headers("u")
    assert headers["x-ratelimit-limit-requests"] == "120"
    assert headers["x-ratelimit-remaining-requests"] == "118"
    assert "x-ratelimit-limit-tokens" not in headers


def test_a_request_refused_for_its_tokens_gives_its_request_back():
    """A tpm refusal never ran: it spends none of the minute's requests, and its 429's
    headers say so."""
    limiter = RateLimiter(Clock())
    limiter.take_request("u", 2, 100)
    with pytest.raises(RateLimitError) as refused:
        limiter.take_tokens("u", 2, 100, 500)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        limiter.take_request("u", 2, 100)
        limiter.take_tokens("u", 2, 100, 10)
    with pytest.raises(RateLimitError):
        limiter.take_request("u", 2, 100)


@given(
    st.integers(1, 5),
    st.integers(1, 200),
    st.lists(st.integers(1, 250), min_size=1, max_size=20),
)
def test_property_only_requests_admitted_for_their_tokens_spend_the_rpm(rpm, tpm, requests):
    """On a stopped clock, any sequence of requests (each its tokens) is refused by the rpm
    exactly once `rpm` of them were admitted by both limits: tpm refusals count for none."""
    limiter = RateLimiter(Clock())
    admitted = 0
    for tokens in requests:
        try:
            limiter.take_request("u", rpm, tpm)
        except RateLimitError:
            assert admitted == rpm
            continue
        assert admitted < rpm
        try:
            limiter.take_tokens("u", rpm, tpm, tokens)
        except RateLimitError:
            continue
        admitted += 1
    assert limiter.headers("u")["x-ratelimit-remaining-requests"] == str(rpm - admitted)


@given(st.integers(1, 1000), st.integers(1, 1000), st.floats(0, 1))
def test_property_a_changed_limit_keeps_what_was_spent_and_a_minute_restores_it(old, new, share):
    """An operator's change to a user's rpm applies at once: what they spent of the old
    limit stays spent under the new one (none left if they spent more than it allows),
    and one minute later the new limit's pace has come back, as a limit per minute says:
    a lowered limit leaves no debt that would lock the user out for longer."""
    clock = Clock()
    limiter = RateLimiter(clock)
    spent = round(share * old)
    for _ in range(spent):
        limiter.take_request("u", old, None)
    if spent < new:
        limiter.take_request("u", new, None)
        assert limiter.headers("u")["x-ratelimit-remaining-requests"] == str(new - spent - 1)
    else:
        with pytest.raises(RateLimitError):
            limiter.take_request("u", new, None)
    clock.now += 60
    limiter.take_request("u", new, None)


class _DownStore:
    """A database that does not answer the reservation (then does, once `up`)."""

    def __init__(self) -> None:
        self.up = False

    async def call(self, fn, *args):
        if not self.up:
            raise StoreUnavailableError("reserve", {}, Exception("connection refused"))
        return True


def test_a_reservation_that_fails_in_the_database_gives_its_tokens_back():
    """A reservation the database does not answer (a 503), or that is cancelled while it
    waits for it (the client gone), never ran: the tpm tokens it took go back, or each
    retry during an outage would drain the bucket and the user be limited after it."""
    clock = Clock()
    store = _DownStore()
    accounts = Accounts(store, limiter=RateLimiter(clock))
    who = Identity.of(UserRow("user_u", "u", 0, tpm=100), None)
    for _ in range(3):
        with pytest.raises(StoreUnavailableError):
            asyncio.run(accounts.reserve(who, Reservation(), 60))
    store.up = True
    held = Reservation()
    asyncio.run(accounts.reserve(who, held, 60))  # not a 429
    assert held.rate_tokens == 60


class _Quota:
    """The quota's reservations in memory; a reservation's caller may be cancelled just
    as its write commits (the client gone at that moment)."""

    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}
        self.cancel_after_commit = True

    async def call(self, fn, *args):
        if fn is db.reserve:
            reservation_id, tokens = args[0], args[3]
            self.reserved[reservation_id] = self.reserved.get(reservation_id, 0) + tokens
            if self.cancel_after_commit:
                raise asyncio.CancelledError
            return True
        if fn is db.settle:
            self.reserved.pop(args[0], None)
        return None


def test_a_reservation_cancelled_as_it_commits_is_released_when_the_request_settles():
    """Cancelled while its write runs, a request cannot know whether the reservation was
    made; settling it must release it if it was, or the user's quota stays held by a
    request that is gone, until the server restarts."""
    quota = _Quota()
    who = Identity.of(UserRow("user_u", "u", 0, token_quota=1_000), None)
    meter = Meter(Accounts(quota, limiter=RateLimiter(Clock())), "embeddings", who)

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await meter.reserve(60)
        await meter.finish("incomplete")

    asyncio.run(scenario())
    assert quota.reserved == {}
