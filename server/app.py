"""The Starlette app: routes, authentication, body limit. Handlers stay thin: they read
the body, parse it (`protocol`), and hand over to `chat` / `completions` / the product;
the generation routes pass through `access.metered` (rate limits, quota, usage rows)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.client import EngineClient
from orchestrator import Accounts, Product, ProductError
from orchestrator.accounts import Meter
from orchestrator.accounts.service import MAX_REPORT_DAYS, REPORT_DAYS
from orchestrator.store import StoreUnavailableError
from orchestrator.store.accounts import is_day
from server import conversations as conv
from server import files as fil
from server import responses as resp
from server import vector_stores as vs
from server.access import AuthMiddleware, DrainGate, identity, metered
from server.chat import create_chat_completion
from server.completions import create_completion
from server.disconnect import unless_disconnected
from server.embeddings import create_embeddings, parse_embedding_request
from server.errors import (
    APIError,
    api_error_handler,
    client_gone_handler,
    http_error_handler,
    server_error_handler,
    store_unavailable_handler,
)
from server.metrics import CONTENT_TYPE
from server.protocol import parse_chat_request, parse_completion_request
from server.request_body import read_json_body
from server.request_ids import RequestIdMiddleware
from server.responses_protocol import parse_limit
from server.state import ServerConfig, ServerState
from server.web import SecurityHeadersMiddleware, web_routes

if TYPE_CHECKING:
    from orchestrator.retrieval.embeddings import Embedder


async def read_json(request: Request, limit: int, parse: Callable[[Any], Any] | None = None) -> Any:
    """The body as JSON, through `parse` if given (415, 413 and 400 for what is not; a
    large body is parsed off the event loop; see `server.request_body`)."""
    return await read_json_body(request, limit, _state(request), parse)


def _state(request: Request) -> ServerState:
    return request.app.state.tokenmill


def _accounts(request: Request) -> Accounts | None:
    product: Product | None = request.app.state.product
    return None if product is None else product.accounts


async def chat_completions(request: Request, meter: Meter) -> Response:
    state = _state(request)
    timer = state.metrics.timer()  # started at arrival: TTFT is what the client waits
    parsed = await read_json(
        request,
        state.config.max_body_bytes,
        partial(
            parse_chat_request,
            max_messages=state.engine.max_model_len,
            request_id_header=request.headers.get("x-request-id"),
        ),
    )
    return await create_chat_completion(
        state, parsed, request.receive, timer, meter, identity(request).user_id
    )


async def completions(request: Request, meter: Meter) -> Response:
    state = _state(request)
    timer = state.metrics.timer()
    parsed = await read_json(
        request,
        state.config.max_body_bytes,
        partial(parse_completion_request, request_id_header=request.headers.get("x-request-id")),
    )
    return await create_completion(
        state, parsed, request.receive, timer, meter, identity(request).user_id
    )


async def create_response(request: Request, meter: Meter) -> Response:
    body = await read_json(request, _state(request).config.max_body_bytes)
    return await resp.create_response(request, body, meter)


async def usage(request: Request) -> Response:
    """The caller's quota and usage per day and model, a page of `limit` days at a time
    (the last `limit` days; `?since=YYYY-MM-DD` to start elsewhere: the report's
    `next_page` is the next page's)."""
    accounts = _accounts(request)
    if accounts is None:
        raise APIError(404, "this server keeps no usage records (it has no store)")
    since = request.query_params.get("since")
    if since is not None and not is_day(since):
        raise APIError(400, "since must be a date, YYYY-MM-DD", param="since")
    days = parse_limit(request.query_params, MAX_REPORT_DAYS, REPORT_DAYS)
    return JSONResponse(await accounts.usage_report(identity(request), since, days))


async def embeddings(request: Request, meter: Meter) -> Response:
    state = _state(request)
    embedder = request.app.state.embedder
    meter.model = embedder.name
    parsed = await read_json(
        request, state.config.max_body_bytes, partial(parse_embedding_request, embedder=embedder)
    )
    # A client that goes away stops the work: it would hold the embedder's one thread.
    response = await unless_disconnected(
        request.receive, partial(create_embeddings, embedder, parsed, meter)
    )
    await meter.finish(meter.stopped_status("incomplete") if response is None else "completed")
    return Response(status_code=499) if response is None else response


def _card(state: ServerState, name: str, root: str, max_model_len: int, task: str) -> dict:
    """A model's card; `task` ("generate" or "embed") tells the embedding model apart (the
    web page lists only the models it can chat with)."""
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "tokenmill",
        "root": root,
        "max_model_len": max_model_len,
        "task": task,
    }


def _model_card(state: ServerState, name: str) -> dict:
    engine = state.engine
    return _card(state, name, engine.model_name, engine.max_model_len, "generate")


def _embedding_card(state: ServerState, embedder) -> dict:
    return _card(state, embedder.name, embedder.name, embedder.window, "embed")


async def list_models(request: Request) -> Response:
    state = _state(request)
    cards = [_model_card(state, n) for n in state.config.served_model_names]
    embedder = request.app.state.embedder
    if embedder is not None:
        cards.append(_embedding_card(state, embedder))
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    state = _state(request)
    embedder = request.app.state.embedder
    if embedder is not None and request.path_params["model"] == embedder.name:
        return JSONResponse(_embedding_card(state, embedder))
    name = state.resolve_model(request.path_params["model"])
    return JSONResponse(_model_card(state, name))


async def health(request: Request) -> Response:
    """200 while serving; 503 once draining or once the engine has died, so load balancers
    stop sending traffic. `compile` says whether the engine runs its compiled backend yet
    ("compiling" while it serves eagerly); `cpu` which kernels the CPU runs and why its
    default modes were chosen."""
    state = _state(request)
    if state.engine.failure is not None:
        return JSONResponse(
            {"status": "engine failed", "error": repr(state.engine.failure)}, status_code=503
        )
    if state.admission.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    stats = state.engine.stats()
    return JSONResponse({"status": "ok", "compile": stats.compile_state, "cpu": stats.cpu})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _with_json_body(handler: Callable[[Request, Any], Awaitable[Response]]):
    """A route that reads the JSON body (size-limited) and hands it to `handler`."""

    async def route(request: Request) -> Response:
        body = await read_json(request, _state(request).config.max_body_bytes)
        return await handler(request, body)

    return route


def product_routes() -> list[Route]:
    """The Responses and Conversations APIs (served when the app has a product)."""
    post, get, delete = ["POST"], ["GET"], ["DELETE"]
    return [
        Route("/v1/responses", metered("responses", create_response, _accounts), methods=post),
        Route("/v1/usage", usage, methods=get),
        Route("/v1/responses/input_tokens", resp.count_input_tokens, methods=post),
        Route("/v1/tools", resp.list_tools, methods=get),
        Route("/v1/responses/{response_id}", resp.retrieve_response, methods=get),
        Route("/v1/responses/{response_id}", resp.delete_response, methods=delete),
        Route("/v1/responses/{response_id}/cancel", resp.cancel_response, methods=post),
        Route("/v1/responses/{response_id}/input_items", resp.list_input_items, methods=get),
        Route("/v1/conversations", _with_json_body(conv.create_conversation), methods=post),
        Route("/v1/conversations", conv.list_conversations, methods=get),
        Route("/v1/conversations/{conversation_id}", conv.retrieve_conversation, methods=get),
        Route(
            "/v1/conversations/{conversation_id}",
            _with_json_body(conv.update_conversation),
            methods=post,
        ),
        Route("/v1/conversations/{conversation_id}", conv.delete_conversation, methods=delete),
        Route("/v1/conversations/{conversation_id}/items", conv.list_items, methods=get),
        Route(
            "/v1/conversations/{conversation_id}/items",
            _with_json_body(conv.create_items),
            methods=post,
        ),
        Route(
            "/v1/conversations/{conversation_id}/items/{item_id}", conv.retrieve_item, methods=get
        ),
        Route(
            "/v1/conversations/{conversation_id}/items/{item_id}", conv.delete_item, methods=delete
        ),
        *file_routes(),
    ]


def file_routes() -> list[Route]:
    """The Files and Vector Stores APIs (served with the product)."""
    post, get, delete = ["POST"], ["GET"], ["DELETE"]
    store, store_file = "/v1/vector_stores/{vector_store_id}", "/files/{file_id}"
    batch = "/file_batches/{batch_id}"
    return [
        Route("/v1/files", fil.create_file, methods=post),
        Route("/v1/files", fil.list_files, methods=get),
        Route("/v1/files/{file_id}", fil.retrieve_file, methods=get),
        Route("/v1/files/{file_id}", fil.delete_file, methods=delete),
        Route("/v1/files/{file_id}/content", fil.file_content, methods=get),
        Route("/v1/vector_stores", _with_json_body(vs.create_vector_store), methods=post),
        Route("/v1/vector_stores", vs.list_vector_stores, methods=get),
        Route(store, vs.retrieve_vector_store, methods=get),
        Route(store, _with_json_body(vs.update_vector_store), methods=post),
        Route(store, vs.delete_vector_store, methods=delete),
        Route(f"{store}/search", vs.search_vector_store, methods=post),
        Route(f"{store}/files", _with_json_body(vs.create_store_file), methods=post),
        Route(f"{store}/files", vs.list_store_files, methods=get),
        Route(f"{store}{store_file}", vs.retrieve_store_file, methods=get),
        Route(f"{store}{store_file}", _with_json_body(vs.update_store_file), methods=post),
        Route(f"{store}{store_file}/content", vs.store_file_content, methods=get),
        Route(f"{store}{store_file}", vs.delete_store_file, methods=delete),
        Route(f"{store}/file_batches", _with_json_body(vs.create_file_batch), methods=post),
        Route(f"{store}{batch}", vs.retrieve_file_batch, methods=get),
        Route(f"{store}{batch}/cancel", vs.cancel_file_batch, methods=post),
        Route(f"{store}{batch}/files", vs.list_batch_files, methods=get),
    ]


def build_app(
    engine: EngineClient,
    config: ServerConfig,
    product: Product | None = None,
    embedder: Embedder | None = None,
) -> Starlette:
    """The app; with a `product`, the Responses and Conversations APIs and the web page
    (`/`) are served too, and with an `embedder`, /v1/embeddings."""
    routes = [
        Route(
            "/v1/chat/completions",
            metered("chat.completions", chat_completions, _accounts),
            methods=["POST"],
        ),
        Route("/v1/completions", metered("completions", completions, _accounts), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(product_routes() + web_routes() if product is not None else []),
    ]
    if embedder is not None:
        routes.append(
            Route("/v1/embeddings", metered("embeddings", embeddings, _accounts), methods=["POST"])
        )
    accounts = None if product is None else product.accounts
    middleware = (
        [Middleware(AuthMiddleware, api_keys=config.api_keys, accounts=accounts)]
        if config.api_keys or accounts is not None
        else []
    )
    if config.allowed_origins:
        # Outermost, so a browser's preflight is answered before the key check.
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=config.allowed_origins,
                allow_methods=["GET", "POST", "DELETE"],
                # Any header: the OpenAI SDKs add their own (x-stainless-*, OpenAI-Project,
                # Idempotency-Key), and a preflight naming one not allowed fails the call.
                # Headers grant nothing here; the API key does.
                allow_headers=["*"],
                expose_headers=["*"],  # ETag, Retry-After, x-ratelimit-*
                max_age=600,
            ),
        )
    middleware.insert(0, Middleware(DrainGate))
    middleware.insert(0, Middleware(SecurityHeadersMiddleware))
    middleware.insert(0, Middleware(RequestIdMiddleware))  # on every response, errors too
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            APIError: api_error_handler,
            ClientDisconnect: client_gone_handler,
            HTTPException: http_error_handler,
            ProductError: resp.product_error_handler,
            StoreUnavailableError: store_unavailable_handler,
            Exception: server_error_handler,
        },
    )
    app.state.tokenmill = ServerState(engine, config)
    if product is not None and product.vector_stores is not None:
        # A vector store's embeddings, metered inside the product, count in /metrics too.
        product.vector_stores.usage_listeners.append(app.state.tokenmill.metrics.on_usage)
    app.state.product = product
    app.state.embedder = embedder
    return app


def start_draining(app: Starlette) -> None:
    """Shutdown's first step: new requests get 503 and /health turns 503, while
    requests already admitted run to completion."""
    app.state.tokenmill.admission.draining = True


def start_preparation(app: Starlette) -> None:
    """Start the preparation process now rather than on the first large request (it
    takes an interpreter's start-up, seconds)."""
    app.state.tokenmill.prep.start()


def stop_preparation(app: Starlette) -> None:
    app.state.tokenmill.prep.close()


def in_flight(app: Starlette) -> int:
    """Sequences admitted and not yet finished: what a drain waits for."""
    return app.state.tokenmill.admission.active
