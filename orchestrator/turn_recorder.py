"""How a `Turn` reaches the store and the budget as it runs: `TurnRecorder`.

A stored response is written `in_progress` (or `queued`) as its turn starts, `in_progress`
when a queued one leaves the queue, checkpointed every few
seconds while it runs (with the usage so far, which a turn that is not stored checkpoints
too), and written in its final state once it ends; while the database does not answer,
that final write is retried in the background, so a short outage leaves no response
`in_progress` (and its conversation locked).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Coroutine

from orchestrator.accounts.meter import CHECKPOINT_S
from orchestrator.events import ResponseEvents, usage
from orchestrator.store import Repository, Store, StoreUnavailableError
from orchestrator.turn_hooks import Budget

log = logging.getLogger("tokenmill")

# How long a turn's final state is retried while the database does not answer (seconds).
RECORD_RETRY_S = 600.0
# The wait before its first retry (seconds); each later wait doubles, up to 30 s.
RECORD_RETRY_FIRST_S = 1.0


class TurnRecorder:
    """One turn's writes: its start, its checkpoints and its final state.

    `store` is None for a response that is not stored: only its usage is checkpointed.
    `usage_so_far` gives the turn's (input, cached, output) tokens, the running
    generation's included."""

    def __init__(
        self,
        store: Store | None,
        record_later: Callable[[Coroutine], None],
        owner: str,
        events: ResponseEvents,
        input_items: list[dict],
        budget: Budget,
        usage_so_far: Callable[[], tuple[int, int, int]],
    ) -> None:
        self.store = store
        self.record_later = record_later
        self.owner = owner
        self.events = events
        self.id: str = events.response["id"]
        self.input_items = input_items
        self.budget = budget
        self.usage_so_far = usage_so_far
        self._begun: asyncio.Future | None = None  # the in_progress row's write
        self._begin_recorded = False  # the in_progress row is written (`_record`)
        self._turn_over = asyncio.Event()  # ends the checkpoints (`_checkpoint`)
        self._checkpoints: asyncio.Task | None = None

    def begin(self, written: bool = False) -> None:
        """Write the response `in_progress` (when stored, unless it is `written` already)
        and start the checkpoints; both run beside the turn, which need not wait for the
        database to stream."""
        store = self.store
        if store is not None and written:
            self._begun = asyncio.get_running_loop().create_future()
            self._begun.set_result(None)
        elif store is not None:
            snapshot = copy.deepcopy(self.events.response)
            self._begun = asyncio.create_task(
                store.call(Repository.begin_response, self.owner, snapshot, self.input_items)
            )
        self._checkpoints = asyncio.create_task(self._checkpoint(store, self._begun))

    async def begun(self) -> None:
        """Wait for the `in_progress` row's write to end, written or failed."""
        if self._begun is not None:
            await asyncio.wait([self._begun])

    async def leave_queue(self) -> None:
        """Write a queued response `in_progress`, as it leaves the queue. A failed write is
        not raised: the final record writes the status it ends with."""
        if self.store is None or self._begun is None:
            return
        try:
            await self._begun
            await self.store.call(Repository.leave_queue, self.owner, self.id)
        except StoreUnavailableError as exc:
            log.warning("response %s: its start was not recorded: %s", self.id, exc)

    async def finish(self, tokens: list[int] | None, history_start: str | None) -> bool:
        """Write the final state (`_record_or_retry`); True when it is written or the
        response is not stored."""
        if self.store is None or self._begun is None:
            return True
        return await self._record_or_retry(self.store, self._begun, tokens, history_start)

    async def _checkpoint(self, store: Store | None, begun: asyncio.Future | None) -> None:
        """Every CHECKPOINT_S (orchestrator/accounts/meter.py) while the turn runs, write its
        usage so far and (when stored) its output as it stands, so a crash of the server
        loses only the last seconds of it (Repository.checkpoint_response) and still leaves
        its usage row (`Budget.checkpoint`). A queued response has nothing to write."""
        written: list[dict] = []
        while True:
            try:
                await asyncio.wait_for(self._turn_over.wait(), CHECKPOINT_S)
                return
            except TimeoutError:
                pass
            if self.events.response["status"] == "queued":
                continue
            try:
                await self.budget.checkpoint(*self.usage_so_far())
            except Exception as exc:  # the next one, or the settlement, writes it
                log.warning("response %s: its usage so far was not checkpointed: %r", self.id, exc)
            if store is not None and begun is not None:
                written = await self._checkpoint_output(store, begun, written)

    async def _checkpoint_output(
        self, store: Store, begun: asyncio.Future, written: list[dict]
    ) -> list[dict]:
        """Write the output, with the usage so far, if it changed since `written`; returns
        what is written now."""
        try:
            await begun
        except StoreUnavailableError:
            return written  # no row to write to; the final record writes both
        output = copy.deepcopy(self.events.output)
        if output == written:
            return written
        input_tokens, cached, output_tokens = self.usage_so_far()
        so_far = usage(input_tokens, output_tokens, cached)
        try:
            await store.call(Repository.checkpoint_response, self.owner, self.id, output, so_far)
        except StoreUnavailableError:
            return written  # the next one, or the final record, writes it
        return output

    async def stop_checkpoints(self) -> None:
        """End the checkpoints and wait for one being written (a write in its thread cannot
        be cancelled), so none lands after the final record."""
        self._turn_over.set()
        if self._checkpoints is not None:
            await asyncio.gather(self._checkpoints, return_exceptions=True)

    async def _record(
        self,
        store: Store,
        begun: asyncio.Future,
        tokens: list[int] | None,
        history_start: str | None,
    ) -> None:
        """Write the turn's final state, and its start first if that write failed."""
        if not self._begin_recorded:
            try:
                await begun
            except StoreUnavailableError:
                await store.call(
                    Repository.begin_response, self.owner, self.events.response, self.input_items
                )
            self._begin_recorded = True
        await store.call(
            Repository.finish_response,
            self.owner,
            self.events.response,
            self.input_items,
            tokens,
            history_start,
        )

    async def _record_or_retry(
        self,
        store: Store,
        begun: asyncio.Future,
        tokens: list[int] | None,
        history_start: str | None,
    ) -> bool:
        """`_record`; False when the database does not answer, the record then retried in
        the background (`_record_until_stored`)."""
        try:
            await self._record(store, begun, tokens, history_start)
        except StoreUnavailableError as exc:
            log.error("response %s could not be recorded: %s", self.id, exc)
            self.record_later(self._record_until_stored(store, begun, tokens, history_start))
            return False
        return True

    async def _record_until_stored(
        self,
        store: Store,
        begun: asyncio.Future,
        tokens: list[int] | None,
        history_start: str | None,
    ) -> None:
        """`_record`, again every few seconds while the database does not answer, so that a
        short outage leaves no response `in_progress` (and its conversation locked)."""
        deadline = time.monotonic() + RECORD_RETRY_S
        delay = RECORD_RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self._record(store, begun, tokens, history_start)
            except StoreUnavailableError as exc:
                if time.monotonic() > deadline:
                    log.error("response %s was never recorded: %s", self.id, exc)
                    return
                delay = min(delay * 2, 30.0)
                continue
            log.info("response %s recorded once the database answered", self.id)
            return
