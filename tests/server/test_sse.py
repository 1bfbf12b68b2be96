"""EventStreamResponse against a client that stops reading."""

from __future__ import annotations

import asyncio

import pytest

from server import sse


def test_a_client_that_stops_reading_loses_its_stream_and_frees_its_slot(monkeypatch):
    """Its socket's buffers full, a write waits on the client: after WRITE_TIMEOUT_S the
    stream ends, the event generator is closed and `on_close` frees the admission slot,
    instead of all three waiting for as long as the connection stays open."""
    monkeypatch.setattr(sse, "WRITE_TIMEOUT_S", 0.2)
    closed: list[str] = []

    async def events():
        try:
            for i in range(1_000):
                yield sse.event({"i": i})
        finally:
            closed.append("events")

    async def run() -> list[dict]:
        sent: list[dict] = []
        unread = asyncio.Event()  # never set: the client reads nothing more

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) > 3:
                await unread.wait()

        async def receive() -> dict:
            await asyncio.Event().wait()  # no disconnect: the connection stays open
            return {}

        response = sse.EventStreamResponse(events(), on_close=lambda: closed.append("slot"))
        await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10)
        return sent

    sent = asyncio.run(run())
    assert closed[:1] == ["events"] and "slot" in closed
    assert not any(m.get("more_body") is False for m in sent)  # the body was never ended


@pytest.mark.parametrize("stalled_at", [1, 2])
def test_a_reading_client_gets_the_whole_stream(monkeypatch, stalled_at):
    """Writes that wait less than WRITE_TIMEOUT_S are only waited for."""
    monkeypatch.setattr(sse, "WRITE_TIMEOUT_S", 5.0)

    async def events():
        yield sse.event({"i": 0})
        yield sse.event({"i": 1}) + sse.DONE

    async def run() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            if len(sent) == stalled_at:
                await asyncio.sleep(0.05)  # the client catches up
            sent.append(message)

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        response = sse.EventStreamResponse(events(), on_close=lambda: None)
        await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10)
        return sent

    sent = asyncio.run(run())
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert sent[-2]["body"].endswith(sse.DONE)
