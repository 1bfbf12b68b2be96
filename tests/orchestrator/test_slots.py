"""KeyedSlots: per-key turns, a bounded wait, and nothing kept for past keys."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.slots import KeyedSlots, SlotWaitTooLong


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
