"""Accounts: key -> user, quota reservations and their settlement, rate limits, usage.

The server asks three things of it per generation request: who is asking
(`authenticate`), may they start (`take_request`, then `reserve` once the prompt is
tokenized: rpm, tpm and the token quota, all before any compute), and what did it cost
(`settle`, exactly once however the request ends). Everything that touches the database
goes through the store's worker thread.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.accounts import keys
from orchestrator.accounts.identity import LOCAL, Identity
from orchestrator.accounts.limiter import RateLimiter
from orchestrator.accounts.periods import period_start, resets_at
from orchestrator.errors import KeyExpiredError, QuotaExceededError
from orchestrator.store import Store
from orchestrator.store import accounts as db
from orchestrator.store import knowledge as kb
from orchestrator.store.accounts import UsageRecord

# The days a page of the usage report holds by default (a month's), and at most.
REPORT_DAYS = 31
MAX_REPORT_DAYS = 100


@dataclass
class Reservation:
    """What one request holds: quota tokens under one reservation id (None until its
    first reservation), in the period it was made in, and tpm tokens."""

    id: str | None = None
    period_start: int = 0
    quota_tokens: int = 0
    rate_tokens: int = 0


class Accounts:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limiter = limiter or RateLimiter()

    async def authenticate(self, secret: str) -> Identity | None:
        """The identity of a live key (None: unknown or revoked; KeyExpiredError once the
        clock reaches its expiry). The lookup that finds the key reads its expiry."""
        found = await self.store.lookup(db.find_key, keys.digest(secret))
        if found is None:
            return None
        key_id, user, expires_at = found
        if expires_at is not None and self.clock() >= expires_at:
            raise KeyExpiredError(
                "This API key has expired: ask the operator for a new one, and send it as "
                "'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        return Identity.of(user, key_id)

    async def keys_required(self) -> bool:
        """Whether any key was ever issued: then every request must present one."""
        return await self.store.lookup(db.any_keys)

    def take_request(self, identity: Identity) -> None:
        """Count one request against the user's rpm (RateLimitError when over)."""
        user = identity.user
        if user is not None:
            self.limiter.take_request(user.id, user.rpm, user.tpm)

    def rate_headers(self, identity: Identity) -> dict[str, str]:
        return {} if identity.user is None else self.limiter.headers(identity.user.id)

    async def reserve(
        self,
        identity: Identity,
        held: Reservation,
        tokens: int,
        spent: int | None = None,
        generates: bool = True,
    ) -> None:
        """Hold `tokens` more for a request: from the user's tpm bucket, then from the
        quota period (one conditional UPDATE). QuotaExceededError / RateLimitError, with
        nothing held, when they do not fit.

        `spent`: for a later generation of a request already admitted, the tokens its
        earlier generations used. The reservation keeps only those of what it held for
        them (their unused output budget is released, not counted twice), and the tpm
        limit counts the new tokens without refusing them."""
        user = identity.user
        if user is None:
            return
        admitted = spent is not None
        more = tokens - (max(0, held.quota_tokens - spent) if admitted else 0)
        self.limiter.take_tokens(user.id, user.rpm, user.tpm, more, admitted)
        now = self.clock()
        first = held.id is None
        reservation_id = f"rsv_{secrets.token_hex(12)}" if first else held.id
        start = period_start(user.quota_period, now) if first else held.period_start
        try:
            fits = await self.store.call(
                db.reserve,
                reservation_id,
                user.id,
                start,
                more,
                user.token_quota,
                now,
                held.quota_tokens > 0,
            )
        except BaseException:  # the database down, or the request gone: nothing runs
            self.limiter.refund_tokens(user.id, more)
            if first:  # cancelled, its write may have committed all the same: the
                # request's settlement releases the reservation if it was made
                held.id, held.period_start = reservation_id, start
            raise
        if not fits:
            self.limiter.refund_tokens(user.id, more)
            state = await self.store.call(db.quota_state, user.id, start)
            # what this generation could have had: the period's free tokens and, for a later
            # generation, what the request holds beyond what it used
            left = max(0, user.token_quota - state.used - state.reserved) + (tokens - more)
            what, lower = (
                ("up to {} tokens (prompt + max output)", "Lower the output token limit")
                if generates
                else ("{} tokens (its inputs)", "Send less input")
            )
            raise QuotaExceededError(
                f"You exceeded your current quota: this request needs {what.format(tokens)}, "
                f"more than the {left} left of your {user.token_quota}-token "
                f"{user.quota_period} quota. {lower}, or ask the operator for more.",
                code="insufficient_quota",
            )
        held.id, held.period_start = reservation_id, start
        held.rate_tokens += more
        held.quota_tokens += more

    async def checkpoint(self, held: Reservation, checkpoint_id: str, record: UsageRecord) -> None:
        """Write a running request's usage so far (`db.checkpoint_usage`)."""
        await self.store.call(
            db.checkpoint_usage, checkpoint_id, held.id, record, held.period_start
        )

    async def settle(
        self,
        identity: Identity,
        held: Reservation,
        record: UsageRecord,
        checkpoint_id: str | None = None,
    ) -> None:
        """Write the request's usage row, charge what it used and release the rest (and
        drop its usage checkpoint). A refusal that holds nothing in the database (an rpm
        or tpm 429, a bad request) has nothing to write there: a flood of them costs the
        store nothing."""
        if record.stored or held.id is not None or checkpoint_id is not None:
            await self.store.call(db.settle, held.id, record, checkpoint_id, held.period_start)
        if identity.user is not None:
            self.limiter.refund_tokens(identity.user.id, held.rate_tokens - record.total_tokens)

    async def usage_report(
        self, identity: Identity, since: str | None = None, days: int = REPORT_DAYS
    ) -> dict:
        """`GET /v1/usage`: the caller's quota and their usage per day and model, of at
        most `days` days from `since` on (oldest first; without `since`, the last `days`
        days, today's included, what a user asks first); `next_page` is the next page's
        `since` (None: this page reaches the last day with usage)."""
        user = identity.user
        now = self.clock()
        if since is None:
            since = time.strftime("%Y-%m-%d", time.gmtime(now - (days - 1) * 86_400))
        if user is None:
            used = await self.store.call(db.usage_total, None)
            quota = {
                "limit": None,
                "period": "total",
                "used": used,
                "reserved": 0,
                "remaining": None,
                "resets_at": None,
            }
        else:
            state = await self.store.call(
                db.quota_state, user.id, period_start(user.quota_period, now)
            )
            limit = user.token_quota
            quota = {
                "limit": limit,
                "period": user.quota_period,
                "used": state.used,
                "reserved": state.reserved,
                "remaining": None if limit is None else max(0, limit - state.used - state.reserved),
                "resets_at": resets_at(user.quota_period, now),
            }
        spanned = await self.store.call(db.usage_days, identity.user_id, since, days + 1)
        page = spanned[:days]
        rows = (
            await self.store.call(db.usage_by_day, identity.user_id, since, page[-1])
            if page
            else []
        )
        stored = await self.store.call(kb.storage_used, identity.owner, int(now))
        storage_limit = None if user is None else user.storage_quota_bytes
        return {
            "object": "usage.report",
            "user": identity.name,
            "quota": quota,
            "storage": {"limit_bytes": storage_limit, "used_bytes": stored},
            "data": [d.report() for d in rows],
            "has_more": len(spanned) > days,
            "next_page": spanned[days] if len(spanned) > days else None,
        }


__all__ = ["LOCAL", "Accounts", "Identity", "Reservation"]
