"""KeyedSlots: per-key turns, a bounded wait, and nothing kept for past keys. FairSlots:
slots shared among owners in turn."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.slots import FairSlots, KeyedSlots, SlotWaitTooLong


def test_holders_of_a_key_take_turns_first_come_first_served_and_keys_are_forgotten():
    slots: KeyedSlots[str] = KeyedSlots(1)
    order: list[str] = []

    async def hold(key: str, name: str) -> None:
        async with slots.hold(key):
            order.append(f"{name} in")
            await asyncio.sleep(0.01)
            order.append(f"{name} out")

    async def scenario() -> None:
        await asyncio.gather(hold("a", "first"), hold("a", "second"), hold("b", "other"))

    asyncio.run(scenario())
    assert order.index("first out") < order.index("second in")  # one holder of "a" at a time
    assert order.index("other in") < order.index("first out")  # "b" does not wait for "a"
    assert slots._semaphores == {} and not slots._users


def test_a_wait_past_its_bound_is_refused_and_leaves_the_line_as_it_was():
    slots: KeyedSlots[str] = KeyedSlots(1)

    async def scenario() -> None:
        async with slots.hold("a"):
            with pytest.raises(SlotWaitTooLong):
                async with slots.hold("a", wait_s=0.02):
                    pass
            assert slots._users["a"] == 1
        async with slots.hold("a", wait_s=0.02):  # free again: taken at once
            pass

    asyncio.run(scenario())
    assert slots._semaphores == {}


class _Runs:
    """Holders of a FairSlots, each inside until released, in the order they were let in."""

    def __init__(self, slots: FairSlots) -> None:
        self.slots = slots
        self.inside: list[tuple[str, asyncio.Event]] = []
        self.tasks: list[asyncio.Task] = []

    def start(self, owner: str) -> asyncio.Task:
        async def run() -> None:
            done = asyncio.Event()
            async with self.slots.hold(owner):
                self.inside.append((owner, done))
                await done.wait()

        task = asyncio.ensure_future(run())
        self.tasks.append(task)
        return task

    def owners_inside(self) -> list[str]:
        return [owner for owner, done in self.inside if not done.is_set()]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_owner_takes_every_slot_and_a_second_waits_one_run_not_the_queue():
    async def scenario() -> None:
        runs = _Runs(FairSlots(2))
        for _ in range(4):
            runs.start("alice")
        await _settle()
        assert runs.owners_inside() == ["alice", "alice"]
        runs.start("bob")
        await _settle()
        runs.inside[0][1].set()  # one of alice's ends: bob's turn, not her third run's
        await _settle()
        assert sorted(runs.owners_inside()) == ["alice", "bob"]
        for task in runs.tasks:
            task.cancel()
        await asyncio.gather(*runs.tasks, return_exceptions=True)
        assert runs.slots._free == 2 and not runs.slots._held and not runs.slots._waiting

    asyncio.run(scenario())


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 3),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["start", "start", "end", "cancel"]),
            st.sampled_from("aab"),
            st.integers(0, 5),
        ),
        max_size=25,
    ),
)
def test_property_a_freed_slot_goes_to_the_waiting_owner_holding_fewest(total, steps):
    """Against a model of the line: never more than `total` inside, and each slot freed
    while some wait goes to a waiter of the owners holding fewest, the one of them served
    longest ago (an owner gone idle forgotten), its earliest waiter."""

    async def scenario() -> None:
        slots = FairSlots(total)
        runs = _Runs(slots)
        waiting: list[tuple[str, asyncio.Task]] = []  # the model's line, oldest first
        served: dict[str, int] = {}
        grants = 0

        def grant(owner: str) -> None:
            nonlocal grants
            grants += 1
            served[owner] = grants

        def forget_idle(inside: list[str]) -> None:
            for owner in list(served):
                if owner not in inside and all(o != owner for o, _ in waiting):
                    del served[owner]

        for action, owner, pick in steps:
            inside = runs.owners_inside()
            if action == "start":
                task = runs.start(owner)
                if len(inside) < total and not waiting:
                    grant(owner)
                    inside = [*inside, owner]
                else:
                    waiting.append((owner, task))
            elif action == "end" and inside:
                entries = [entry for entry in runs.inside if not entry[1].is_set()]
                _, done = entries[pick % len(entries)]
                done.set()
                inside = [o for o, d in runs.inside if not d.is_set()]
                if waiting:
                    held = Counter(inside)
                    nxt = min(
                        range(len(waiting)),
                        key=lambda i: (held[waiting[i][0]], served.get(waiting[i][0], 0), i),
                    )
                    chosen = waiting.pop(nxt)[0]
                    grant(chosen)
                    inside.append(chosen)
            elif action == "cancel" and waiting:
                _, task = waiting.pop(pick % len(waiting))
                task.cancel()
            else:
                continue
            forget_idle(inside)
            await _settle()
            assert sorted(runs.owners_inside()) == sorted(inside)
            assert len(inside) <= total
        for task in runs.tasks:
            task.cancel()
        await asyncio.gather(*runs.tasks, return_exceptions=True)
        assert slots._free == total and not slots._held and not slots._waiting
        assert not slots._served

    asyncio.run(scenario())
