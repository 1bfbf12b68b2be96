"""Routes of the Responses API: parse, call the orchestrator, format JSON or SSE.

A streamed response is sent as named Server-Sent Events (`event: response.created`…),
as OpenAI sends them, with no `[DONE]` line. If the client goes away mid-stream, the
turn is told to stop and records itself as `incomplete` with the text so far. A
background response (`background: true`) runs on whatever its client does: its create
returns it at once, `queued` while it waits for the user's place in the server's queue
(or streams it without the disconnect stopping it), and
`GET /v1/responses/{id}?stream=true&starting_after=N` streams it again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from orchestrator import Product, ProductError
from orchestrator.accounts import Meter
from orchestrator.turn import Turn
from server.access import identity, owner, product_api_error, take_request
from server.disconnect import unless_disconnected
from server.errors import known_fields
from server.json_body import json_response
from server.request_body import read_json_body
from server.responses_protocol import (
    check_query_include,
    parse_page,
    parse_response_request,
    parse_stream_query,
)
from server.sse import EventStreamResponse
from server.state import ServerState, Ticket


def product(request: Request) -> Product:
    return request.app.state.product


async def product_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProductError)
    return product_api_error(exc).response()


class _Observers:
    """The turn's token observer: the latency metrics and the usage meter."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def on_tokens(self, count: int) -> None:
        for observer in self.observers:
            observer.on_tokens(count)

    def on_finished(self) -> None:
        for observer in self.observers:
            observer.on_finished()


def _sse(event: dict) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


class _Release:
    """Releases a background turn's admission ticket as the turn ends (an observer)."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket

    def on_tokens(self, count: int) -> None:
        pass

    def on_finished(self) -> None:
        self.ticket.release()


class _Place:
    """A response's place in the admission queue (the turn's `Place`): its ticket's, and
    the meter's submission once it is admitted (`queue_time` runs to it). `receive`: the
    client's, which a response waiting with its client gives up with (None: a background
    response, which waits without one)."""

    def __init__(self, ticket: Ticket, meter: Meter, receive: Receive | None) -> None:
        self.ticket = ticket
        self.meter = meter
        self.receive = receive

    @property
    def queued(self) -> bool:
        return self.ticket.queued

    async def wait(self) -> None:
        if self.receive is None:
            await self.ticket.wait()
        else:
            await self.ticket.wait_while_connected(self.receive)
        self.meter.on_submit(0)  # the turn's task submits its first generation


async def _event_stream(events: AsyncIterator[dict]) -> AsyncGenerator[bytes, None]:
    async for event in events:
        yield _sse(event)


async def _background(request: Request, turn: Turn, stream: bool) -> Response:
    """A background response's answer: its events, which its client may leave, or the
    response as it starts, once stored (`Turn.begun`)."""
    await turn.begun()
    if stream:
        return EventStreamResponse(_event_stream(turn.stream()), on_close=lambda: None)
    return await json_response(await product(request).responses.retrieve(owner(request), turn.id))


async def create_response(request: Request, body: Any, meter: Meter) -> Response:
    """Start a turn; the turn itself settles `meter` (its reservation and usage row)
    when it ends, however it ends."""
    state: ServerState = request.app.state.tokenmill
    timer = state.metrics.timer()
    parsed, stream = parse_response_request(body, state.resolve_model)
    meter.model = parsed.model
    # A place taken at once (a 429 when the server is full); the request's checks run
    # before it is waited for (`ResponseService.create`), so a mistake is answered at once
    # however full the user's share. A background create is answered at once too: its
    # turn waits for the place, queued.
    ticket = state.admission.enter(owner=identity(request).user_id, bounded=parsed.background)
    # A background turn holds its ticket until it ends; any other, until its request does.
    observers = _Observers(timer, meter, *([_Release(ticket)] if parsed.background else []))
    try:
        turn = await product(request).responses.create(
            owner(request),
            parsed,
            observers,
            meter,
            _Place(ticket, meter, None if parsed.background else request.receive),
        )
    except BaseException:
        ticket.release()
        raise
    if parsed.background:
        return await _background(request, turn, stream)
    if stream:

        def close() -> None:
            turn.stop("incomplete")  # a no-op when the turn already ended
            ticket.release()

        return EventStreamResponse(_event_stream(turn.stream()), on_close=close)
    try:
        result = await unless_disconnected(request.receive, turn.wait)
    finally:
        ticket.release()
    if result is None:
        turn.stop("incomplete")
        return Response(status_code=499)
    return await json_response(result)


# What POST /v1/responses/input_tokens takes: the fields of a response that shape its prompt.
_COUNT_FIELDS = {
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "conversation",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "truncation",
}


async def count_input_tokens(request: Request) -> Response:
    """OpenAI's input token count: the prompt a response with these fields would start
    from, counted without generating. A request of the user's rpm limit, as OpenAI
    counts it, taken before the body is read (as the generation routes take theirs): a
    user past it costs no parsing, file reading or rendering. No tokens are metered or
    charged to the quota, as none are computed."""
    state: ServerState = request.app.state.tokenmill
    headers = take_request(request, product(request).accounts)
    body = await read_json_body(request, state.config.max_body_bytes, state)
    parsed, _ = parse_response_request(
        known_fields(body, _COUNT_FIELDS), state.resolve_model, input_required=False
    )
    count = await product(request).responses.count_input_tokens(owner(request), parsed)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": count}, headers=headers)


async def list_tools(request: Request) -> Response:
    """`GET /v1/tools`, tokenmill's own: the built-in tools this server runs (OpenAI's
    API has no such list; the web page reads it to offer code execution only where the
    sandbox works)."""
    return JSONResponse({"object": "list", "data": product(request).responses.builtin_tools()})


async def retrieve_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    query = request.query_params
    include = check_query_include(query)
    stream, after = parse_stream_query(query)
    if stream:
        events = await product(request).responses.stream(owner(request), response_id, after)
        return EventStreamResponse(_event_stream(events), on_close=lambda: None)
    return await json_response(
        await product(request).responses.retrieve(owner(request), response_id, include)
    )


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    return JSONResponse(await product(request).responses.delete(owner(request), response_id))


async def cancel_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    body = await product(request).responses.cancel(owner(request), response_id)
    return await json_response(body)


async def list_input_items(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    page = parse_page(request.query_params)
    include = check_query_include(request.query_params)
    return await json_response(
        await product(request).responses.input_items(owner(request), response_id, page, include)
    )
