"""Routes of the Responses API: parse, call the orchestrator, format JSON or SSE.

A streamed response is sent as named Server-Sent Events (`event: response.created`…),
as OpenAI sends them, with no `[DONE]` line. If the client goes away mid-stream, the
turn is told to stop and records itself as `incomplete` with the text so far.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator import LOCAL_USER, NotFoundError, Product, ProductError
from orchestrator.responses import Turn
from server.disconnect import unless_disconnected
from server.errors import APIError
from server.responses_protocol import parse_page, parse_response_request
from server.sse import EventStreamResponse
from server.state import ServerState


def product(request: Request) -> Product:
    return request.app.state.product


def owner(request: Request) -> str:
    """The user a request acts for (one local user until accounts exist)."""
    return LOCAL_USER


async def product_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProductError)
    status = 404 if isinstance(exc, NotFoundError) else 400
    return APIError(status, exc.message, param=exc.param, code=exc.code).response()


def _sse(event: dict) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def _event_stream(turn: Turn) -> AsyncGenerator[bytes, None]:
    async for event in turn.stream():
        yield _sse(event)


async def create_response(request: Request, body: Any) -> Response:
    state: ServerState = request.app.state.tokenmill
    timer = state.metrics.timer()
    parsed, stream = parse_response_request(body, state.resolve_model)
    ticket = state.admission.acquire()
    try:
        turn = await product(request).responses.create(owner(request), parsed, timer)
    except BaseException:
        ticket.release()
        raise
    if stream:
        def close() -> None:
            turn.stop("incomplete")  # a no-op when the turn already ended
            ticket.release()

        return EventStreamResponse(_event_stream(turn), on_close=close)
    try:
        result = await unless_disconnected(request.receive, turn.wait)
    finally:
        ticket.release()
    if result is None:
        turn.stop("incomplete")
        return Response(status_code=499)
    return JSONResponse(result)


async def retrieve_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    return JSONResponse(await product(request).responses.retrieve(owner(request), response_id))


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    return JSONResponse(await product(request).responses.delete(owner(request), response_id))


async def cancel_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    return JSONResponse(await product(request).responses.cancel(owner(request), response_id))


async def list_input_items(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    page = parse_page(request.query_params)
    return JSONResponse(
        await product(request).responses.input_items(owner(request), response_id, page))
