"""Server-Sent Events: the framing, and a response that streams them without buffering.

`EventStreamResponse` differs from Starlette's `StreamingResponse` in three ways that
matter for an inference server:
- it always watches for the client's disconnect and then stops and closes the event
  generator at once (which aborts the engine request and frees its KV blocks), not
  only when a later write happens to fail;
- it waits for the first event before sending the status line, so an error the engine
  raises before producing anything (a prompt too large for the KV pool, say) is still
  a proper 4xx JSON response rather than a 200 followed by an error event, with the
  headers the stream was given (a limited user's x-ratelimit-*);
- an API error after the stream has started is sent as an OpenAI-style error event,
  followed by `[DONE]` so clients stop reading;
- `on_close` (idempotent) runs before `[DONE]` is sent as well as at the end, so a client
  that sends its next request as soon as it reads `[DONE]` finds the admission slot free;
- a write the client leaves unread for `WRITE_TIMEOUT_S` (its socket's buffers full)
  ends the stream: the connection is dropped and the request's admission slot freed.
  Without it a client that stops reading would hold its slot, and the output buffered
  for it, for as long as it keeps the connection open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.disconnect import wait_for_disconnect
from server.errors import APIError

DONE = b"data: [DONE]\n\n"
WRITE_TIMEOUT_S = 60.0  # nginx's send_timeout: how long one write may wait for the client

log = logging.getLogger(__name__)


class ClientStalled(Exception):
    """The client read nothing for WRITE_TIMEOUT_S while a write waited on it."""


def event(payload: dict) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + (b"\n\n")
    )


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._stream_headers = set(self.headers)  # what an error answered instead drops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self._send_events(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # surface a failure in the stream itself
        except ClientStalled:
            # Returning without ending the body has the server close the connection.
            log.warning("a client read nothing for %.0f s: its stream was dropped", WRITE_TIMEOUT_S)
        finally:
            sender.cancel()
            watcher.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.events.aclose()
            self.on_close()

    def _given_headers(self) -> dict[str, str]:
        """The headers set on this response beyond those of an event stream."""
        return {k: v for k, v in self.headers.items() if k not in self._stream_headers}

    async def _send_events(self, send: Send) -> None:
        send = _bounded(send)
        try:
            first = await anext(self.events, None)
        except APIError as err:
            err.headers = {**self._given_headers(), **err.headers}
            await _send_error_response(send, err)
            return
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            try:
                async for chunk in self.events:
                    if chunk.endswith(DONE):
                        self.on_close()  # the client may send its next request on [DONE]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except APIError as err:
                self.on_close()
                await send(
                    {
                        "type": "http.response.body",
                        "body": event(err.body()) + DONE,
                        "more_body": True,
                    }
                )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _bounded(send: Send) -> Send:
    """`send`, where a message the client leaves unread for WRITE_TIMEOUT_S raises
    ClientStalled (the server waits on the socket's buffers draining)."""

    async def bounded(message: dict) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await send(message)
        except TimeoutError:
            raise ClientStalled from None

    return bounded


async def _send_error_response(send: Send, err: APIError) -> None:
    response = err.response()
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})
