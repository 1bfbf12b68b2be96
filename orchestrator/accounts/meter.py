"""One generation request's account: its reservation, its token counts and times, and
the single usage row written when it ends (none for a refusal: `UsageRecord.stored`).

The routes create a `Meter` at arrival and feed it as the request runs (`on_submit` when
a prompt goes to the engine, `on_refused` when the engine refuses it there, `on_tokens` as
tokens come back, `on_cached` when a prompt finishes, `on_aborted` when one is stopped
before its end). `finish(status)` settles the
reservation and writes the row exactly once; every way a request can end (completed, cut,
cancelled, the client gone, an error, a refusal before any compute) calls it, and the later
calls do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.accounts.identity import LOCAL, Identity
from orchestrator.accounts.service import Accounts, Reservation
from orchestrator.store.accounts import UsageRecord

log = logging.getLogger("tokenmill")

STATUSES = ("completed", "incomplete", "cancelled", "failed", "rejected")
# The endpoints whose requests only embed (inputs, no output): /v1/embeddings, a vector
# store's ingestion of a file's chunks and its searches' queries (VectorStoreService).
EMBEDDING_ENDPOINTS = ("embeddings", "vector_stores.files", "vector_stores.search")
# How often a running request writes its usage so far (`Meter.checkpoint`): a crash of the
# server loses at most this much of it.
CHECKPOINT_S = 2.0
# Settlements started from synchronous callbacks, held until done (the event loop keeps
# only weak references to tasks).
_pending: set[asyncio.Task] = set()


@dataclass
class Meter:
    accounts: Accounts | None
    endpoint: str
    identity: Identity = LOCAL
    model: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    submitted_at: float | None = None
    first_token_at: float | None = None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    held: Reservation = field(default_factory=Reservation)
    # The request's id in its usage row, which holds one row per request however many
    # times it is settled (`store.accounts._write_usage`).
    request_id: str = field(default_factory=lambda: f"req_{secrets.token_hex(12)}")
    # Called with the row once written (the server's per-endpoint counters).
    listeners: list[Callable[[UsageRecord], None]] = field(default_factory=list)
    record: UsageRecord | None = None
    # Set by the first `checkpoint`: the key of this request's usage checkpoint row.
    checkpoint_id: str | None = None
    # How a stream ended, as far as its generator saw (`close` finishes with it): a
    # stream cut before its end was left by its client.
    outcome: str = "incomplete"
    # The user's x-ratelimit-* headers right after the first reservation (`rate_headers`).
    admitted_headers: dict[str, str] | None = None
    _settling: asyncio.Task | None = None
    _checkpointing: asyncio.Task | None = None  # the latest `checkpoint_if_due` write
    _checkpointed_at: float = field(default_factory=time.perf_counter)

    async def reserve(self, tokens: int, spent: int | None = None) -> None:
        """Hold `tokens` (prompt + output budget) before they are spent; `spent`: what the
        request's earlier generations used (`Accounts.reserve`)."""
        if self.accounts is not None:
            generates = self.endpoint not in EMBEDDING_ENDPOINTS  # no output to lower
            await self.accounts.reserve(self.identity, self.held, tokens, spent, generates)
            if self.admitted_headers is None:
                self.admitted_headers = self.accounts.rate_headers(self.identity)

    def rate_headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for this request's answer: the user's limits as
        they stood once it was admitted (what each has left after this request and its
        tokens' reservation), or as they stand now for one refused before. Taken at the
        end, a request that ran for seconds would show limits refilled meanwhile, as if it
        had cost nothing."""
        if self.accounts is None:
            return {}
        if self.admitted_headers is not None:
            return self.admitted_headers
        return self.accounts.rate_headers(self.identity)

    def on_submit(self, prompt_tokens: int) -> None:
        if self.submitted_at is None:
            self.submitted_at = time.perf_counter()
        self.input_tokens += prompt_tokens

    def on_refused(self, prompt_tokens: int) -> None:
        """The engine refused a prompt `on_submit` counted, at its submission (a client's
        mistake only it finds, such as a prompt longer than its context), or an embedding
        batch was dropped from the embedder's queue unrun (its request cancelled first):
        it computed none of it, so it is not charged, and a request with nothing else
        computed is a refusal (`error_status`, `stopped_status`)."""
        self.input_tokens -= prompt_tokens

    def on_tokens(self, count: int) -> None:
        if count > 0 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_tokens += count

    def on_cached(self, count: int) -> None:
        self.cached_input_tokens += count

    def on_aborted(self, unseen_tokens: int, cached_tokens: int) -> None:
        """A generation stopped before its end (`AsyncLLM.generate`'s `on_abort`): the
        output tokens the engine made that no output carried, and the prompt's prefix-cache
        hit, which only its finished output would otherwise have reported."""
        self.on_tokens(unseen_tokens)
        self.on_cached(cached_tokens)

    def on_finished(self) -> None:
        """(The token observer's end: the row is written by `finish`.)"""

    async def settle(
        self, status: str, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None:
        """Finish with counts the caller kept itself (a response's usage)."""
        self.input_tokens, self.cached_input_tokens = input_tokens, cached_tokens
        self.output_tokens = output_tokens
        await self.finish(status)

    async def checkpoint(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        """Write the usage so far, which a crash would otherwise lose (a Responses turn's
        checkpoints call this): the next start settles it as `incomplete`. Once the
        request settles, this does nothing."""
        if self.accounts is None or self.finished:
            return
        self.input_tokens, self.cached_input_tokens = input_tokens, cached_tokens
        self.output_tokens = output_tokens
        if self.checkpoint_id is None:
            self.checkpoint_id = f"ckpt_{secrets.token_hex(12)}"
        await self.accounts.checkpoint(self.held, self.checkpoint_id, self._record("incomplete"))

    def checkpoint_if_due(self) -> None:
        """For the routes whose meter counts the tokens itself (chat and completions; a
        Responses turn checkpoints its own counts): `checkpoint` those counts once
        CHECKPOINT_S have passed since the last one. The write runs as a task, which the
        settlement waits for, so that no checkpoint lands after the usage row."""
        if self.accounts is None or self.finished:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        now = time.perf_counter()
        if now - self._checkpointed_at < CHECKPOINT_S:
            return
        self._checkpointed_at = now
        self._checkpointing = asyncio.ensure_future(self._checkpoint_counts())

    async def _checkpoint_counts(self) -> None:
        try:
            await self.checkpoint(self.input_tokens, self.cached_input_tokens, self.output_tokens)
        except Exception as exc:  # the next one, or the settlement, writes it
            log.warning("a %s request's usage so far was not checkpointed: %r", self.endpoint, exc)

    async def finish(self, status: str) -> None:
        """Write the usage row and settle the reservation (once; later calls wait for it)."""
        await asyncio.shield(self._start(status))

    def close(self) -> None:
        """`finish` with the stream's `outcome`, from a synchronous callback (a stream
        cut before the engine took any of it is a refusal: `stopped_status`)."""
        cut = self.outcome == "incomplete"
        self._start(self.stopped_status(self.outcome) if cut else self.outcome)

    def _start(self, status: str) -> asyncio.Task:
        """The settlement's task (started by the first call), held until it is done even
        if whoever started it goes away."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._finish(status))
            _pending.add(self._settling)
            self._settling.add_done_callback(_pending.discard)
        return self._settling

    def error_status(self, http_status: int) -> str:
        """How a request that raised an error ended: `rejected` when refused before the
        engine took any of its tokens (a client's error, a limit), else `failed`. A request
        refused after its prompt went in (constraints that leave nothing to sample) is
        charged that prompt, so it is no refusal: its usage row (which a refusal does
        not get) lets the usage report show what the quota counts."""
        return "rejected" if http_status < 500 and not self.computed else "failed"

    def stopped_status(self, status: str) -> str:
        """How a request stopped before its end (its client gone: `incomplete`; cancelled:
        `cancelled`) ended: `status`, charged what the engine computed, once it computed
        any of it; else `rejected`, with no usage row and nothing charged, as a request
        that never ran (gone while it waited for its share, or for the embedder)."""
        return status if self.computed else "rejected"

    @property
    def computed(self) -> bool:
        """Whether the engine (or embedder) took any of this request's tokens."""
        return self.input_tokens > 0 or self.output_tokens > 0

    @property
    def finished(self) -> bool:
        return self._settling is not None

    def _record(self, status: str) -> UsageRecord:
        def since_arrival(moment: float | None) -> float | None:
            return None if moment is None else moment - self.arrival

        return UsageRecord(
            user_id=self.identity.user_id,
            key_id=self.identity.key_id,
            endpoint=self.endpoint,
            model=self.model,
            input_tokens=self.input_tokens,
            cached_input_tokens=self.cached_input_tokens,
            output_tokens=self.output_tokens,
            status=status,
            queue_time=since_arrival(self.submitted_at),
            ttft=since_arrival(self.first_token_at),
            duration=time.perf_counter() - self.arrival,
            created_at=self.created_at,
            request_id=self.request_id,
        )

    async def _finish(self, status: str) -> None:
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        self.record = self._record(status)
        try:
            if self.accounts is not None:
                await self.accounts.settle(
                    self.identity, self.held, self.record, self.checkpoint_id
                )
        except Exception:  # the request is over either way; the operator must hear of it
            log.exception("the usage of a %s request could not be recorded", self.endpoint)
        for listener in self.listeners:
            listener(self.record)
