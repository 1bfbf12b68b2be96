"""The Starlette app: routes, API-key check, body limit. Handlers stay thin: they read
the body, parse it (`protocol`), and hand over to `chat` / `completions`."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.chat import create_chat_completion
from server.completions import create_completion
from server.engine_client import EngineClient
from server.errors import APIError, api_error_handler, http_error_handler, invalid
from server.metrics import CONTENT_TYPE
from server.protocol import parse_chat_request, parse_completion_request
from server.state import ServerConfig, ServerState


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeyMiddleware:
    """With keys configured, every /v1 route needs `Authorization: Bearer <key>`.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every
    configured key without stopping early, so timing reveals neither a key's content
    nor its length nor which key matched.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.digests = [_digest(k) for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"].startswith("/v1")
        if guarded and not self._authorized(Headers(scope=scope).get("authorization", "")):
            error = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        presented = _digest(token.strip())
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(presented, digest)
        return scheme.lower() == "bearer" and matched


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes without buffering them."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _state(request: Request) -> ServerState:
    return request.app.state.tokenmill


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    timer = state.metrics.timer()  # started at arrival: TTFT is what the client waits
    body = await read_json(request, state.config.max_body_bytes)
    return await create_chat_completion(state, parse_chat_request(body), request.receive, timer)


async def completions(request: Request) -> Response:
    state = _state(request)
    timer = state.metrics.timer()
    body = await read_json(request, state.config.max_body_bytes)
    return await create_completion(state, parse_completion_request(body), request.receive, timer)


def _model_card(state: ServerState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "tokenmill",
        "root": state.engine.model_name,
        "max_model_len": state.engine.max_model_len,
    }


async def list_models(request: Request) -> Response:
    state = _state(request)
    cards = [_model_card(state, n) for n in state.config.served_model_names]
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    state = _state(request)
    name = state.resolve_model(request.path_params["model"])
    return JSONResponse(_model_card(state, name))


async def health(request: Request) -> Response:
    """200 while serving; 503 once draining, so load balancers stop sending traffic. `compile`
    says whether the engine runs compiled blocks yet ("compiling" while it serves eagerly);
    `cpu` which kernels the CPU runs and why its default modes were chosen."""
    state = _state(request)
    if state.admission.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    stats = state.engine.stats()
    return JSONResponse({"status": "ok", "compile": stats.compile_state, "cpu": stats.cpu})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


def build_app(engine: EngineClient, config: ServerConfig) -> Starlette:
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_keys=config.api_keys)] if config.api_keys else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={APIError: api_error_handler, HTTPException: http_error_handler},
    )
    app.state.tokenmill = ServerState(engine, config)
    return app


def start_draining(app: Starlette) -> None:
    """Shutdown's first step: new requests get 503 and /health turns 503, while
    requests already admitted run to completion."""
    app.state.tokenmill.admission.draining = True
