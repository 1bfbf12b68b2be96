"""Admission's fair share: one user's sequences in the engine are capped; the rest wait
in the server's queue, in order, and never hold back another user."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import APIError
from server.state import Admission, ServerConfig, Ticket


def _admission(per_user: int | None, capacity: int = 16) -> Admission:
    return Admission(
        ServerConfig(
            ["m"],
            max_running_requests=capacity,
            max_waiting_requests=0,
            max_sequences_per_user=per_user,
        )
    )


async def _acquire(admission: Admission, sequences: int, owner: str | None = None) -> Ticket:
    """A place, once admitted (a request's checks passed)."""
    ticket = admission.enter(sequences, owner=owner)
    await ticket.wait()
    return ticket


async def _pending(coro) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return task


def test_a_flooding_user_waits_for_their_own_share_while_another_goes_first():
    async def scenario() -> None:
        admission = _admission(per_user=2)
        a1 = await _acquire(admission, 1, owner="a")
        a2 = await _acquire(admission, 1, owner="a")
        a3 = await _pending(_acquire(admission, 1, owner="a"))
        a4 = await _pending(_acquire(admission, 1, owner="a"))
        assert not a3.done() and not a4.done()
        b1 = await asyncio.wait_for(_acquire(admission, 1, owner="b"), 1)  # not behind a's queue
        local = await _acquire(admission, 5)  # the local user is not capped
        assert admission.active == 10 and admission.running == {"a": 2, "b": 1}
        a1.release()
        await asyncio.sleep(0)
        assert a3.done() and not a4.done()  # first come, first served
        a1.release()  # idempotent
        a2.release()
        await asyncio.sleep(0)
        assert a4.done()
        for ticket in (a3.result(), a4.result(), b1, local):
            ticket.release()
        assert admission.active == 0 and admission.running == {} and admission.waiting == {}

    asyncio.run(scenario())


def test_a_request_larger_than_the_share_runs_alone_and_a_cancelled_wait_frees_its_slot():
    async def scenario() -> None:
        admission = _admission(per_user=2)
        big = await _acquire(admission, 4, owner="a")  # nothing of a's running: it goes
        waiting = await _pending(_acquire(admission, 1, owner="a"))
        assert admission.active == 5
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission.active == 4 and admission.waiting == {}
        big.release()
        assert admission.active == 0 and admission.running == {}

    asyncio.run(scenario())


def test_waiting_requests_count_against_capacity():
    async def scenario() -> None:
        admission = _admission(per_user=1, capacity=3)
        first = await _acquire(admission, 1, owner="a")
        queued = [await _pending(_acquire(admission, 1, owner="a")) for _ in range(2)]
        with pytest.raises(APIError) as full:
            await _acquire(admission, 1, owner="b")
        assert full.value.status == 429
        first.release()
        await asyncio.sleep(0)
        queued[0].result().release()
        await asyncio.sleep(0)
        queued[1].result().release()
        assert admission.active == 0

    asyncio.run(scenario())


def test_without_a_cap_owners_are_not_tracked():
    async def scenario() -> None:
        admission = _admission(per_user=None)
        tickets = [await _acquire(admission, 1, owner="a") for _ in range(10)]
        assert admission.running == {}
        for ticket in tickets:
            ticket.release()
        assert admission.active == 0

    asyncio.run(scenario())


def test_a_place_taken_at_once_queues_up_to_the_share_and_leaves_the_queue_when_released():
    """`enter` answers at once (a background response's create): queued behind the owner's
    share, at most `per_user` sequences of it (`bounded`), and a queued ticket released
    leaves the queue without ever having run."""

    async def scenario() -> None:
        admission = _admission(per_user=1)
        running = admission.enter(owner="a", bounded=True)
        queued = admission.enter(owner="a", bounded=True)
        assert not running.queued and queued.queued
        with pytest.raises(APIError) as full:
            admission.enter(owner="a", bounded=True)
        assert full.value.status == 429
        assert not admission.enter(owner="b", bounded=True).queued  # not behind a's queue
        queued.release()
        assert admission.waiting == {} and admission.running["a"] == 1
        later = admission.enter(owner="a", bounded=True)
        assert later.queued
        running.release()
        await later.wait()
        assert not later.queued and admission.running["a"] == 1 and admission.waiting == {}

    asyncio.run(scenario())
