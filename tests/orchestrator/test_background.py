"""The event logs of turns (`EventLog`) and the background responses' ones this server
keeps (`BackgroundStreams`)."""

from __future__ import annotations

import asyncio
import json

from orchestrator.background import BackgroundStreams
from orchestrator.event_log import EventLog


def _event(n: int, delta: str = "") -> dict:
    return {"type": "response.output_text.delta", "sequence_number": n, "delta": delta}


ONE = len(json.dumps(_event(0), separators=(",", ":")))  # an event's size (n below 10)


async def _numbers(log: EventLog, after: int = -1) -> list[int]:
    return [event["sequence_number"] async for event in log.follow(after)]


def test_a_kept_log_replays_its_events_after_a_number_then_follows_the_rest():
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        log = EventLog(keep=True)
        for n in range(3):
            log.put(_event(n))
        resumed = asyncio.ensure_future(_numbers(log, after=1))
        whole = asyncio.ensure_future(_numbers(log))
        await asyncio.sleep(0)
        log.put(_event(3))
        log.close()
        return await resumed, await whole, await _numbers(log, after=0)

    resumed, whole, again = asyncio.run(scenario())
    assert resumed == [2, 3]
    assert whole == [0, 1, 2, 3]
    assert again == [1, 2, 3]  # a finished log is read again whole


def test_a_log_not_kept_drops_what_its_reader_took():
    log = EventLog(keep=False)

    async def scenario() -> list[int]:
        log.put(_event(0))
        log.put(_event(1))
        log.close()
        return await _numbers(log)

    assert asyncio.run(scenario()) == [0, 1]
    assert log._events == []


def test_finished_background_logs_are_dropped_after_their_time_or_past_the_most():
    """Finished logs are kept for their time, and only as many events as the bound
    allows all told, the oldest responses' dropped first; running ones stay."""
    streams = BackgroundStreams(retain_s=60, most_chars=2 * ONE)
    running, old, newer = EventLog(keep=True), EventLog(keep=True), EventLog(keep=True)
    for n in range(5):
        running.put(_event(n))
    old.put(_event(0))
    newer.put(_event(0))
    newer.put(_event(1))
    streams.add("alice", "resp_running", running)
    streams.add("alice", "resp_old", old)
    streams.add("alice", "resp_newer", newer)
    assert streams.get("bob", "resp_running") is None  # another owner's
    old.close()
    assert streams.get("alice", "resp_old") is old  # 1 finished event: within the bound
    newer.close()
    assert streams.get("alice", "resp_old") is None  # 3 events past 2: the oldest log goes
    assert streams.get("alice", "resp_newer") is newer
    newer.closed_at -= 61
    assert streams.get("alice", "resp_newer") is None  # kept its time
    assert streams.get("alice", "resp_running") is running  # a running one stays


def test_past_the_most_the_logs_that_ended_first_go_first():
    """A long response started before a short one but ending after it is the one a client
    is likelier to still resume: past the bound, the log that ended first goes, not the
    one created first."""
    streams = BackgroundStreams(retain_s=60, most_chars=2 * ONE)
    long, short = EventLog(keep=True), EventLog(keep=True)
    streams.add("alice", "resp_long", long)
    streams.add("alice", "resp_short", short)
    for log in (short, long):
        log.put(_event(0))
        log.put(_event(1))
        log.close()
    long.closed_at = short.closed_at + 1
    assert streams.get("alice", "resp_long") is long
    assert streams.get("alice", "resp_short") is None


def test_the_bound_weighs_each_event_by_its_size():
    """An event carrying 20 top logprobs per token, or a final event with the whole
    answer, holds many times a plain delta's memory: the finished logs are bounded by
    the size of their events (as JSON), not by their count, or a few responses asking for
    logprobs would keep a gigabyte."""
    streams = BackgroundStreams(retain_s=60, most_chars=100 * ONE)
    heavy, light = EventLog(keep=True), EventLog(keep=True)
    streams.add("alice", "resp_heavy", heavy)
    streams.add("alice", "resp_light", light)
    for n in range(3):
        heavy.put(_event(n, "x" * 100 * ONE))
        light.put(_event(n))
    heavy.close()
    light.close()
    assert streams.get("alice", "resp_heavy") is None  # 3 events, past the bound
    assert streams.get("alice", "resp_light") is light
