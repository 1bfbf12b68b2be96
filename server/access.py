"""Who is asking, and the door every generation request passes: authentication, rate
limits, the usage meter, and the x-ratelimit-* headers.

`AuthMiddleware` resolves `Authorization: Bearer <key>` to an `Identity` for every /v1
route: a key in the store is its user; an `--api-key` key is the operator (the local
user, no limits); with neither configured nor issued the server is open (the local
user). The routes read it with `identity(request)` / `owner(request)`.

`metered(endpoint, handler)` wraps the generation routes and embeddings: it takes the
request from the user's rpm bucket, hands the handler a `Meter` (which reserves the
prompt and output budget before any compute and writes one usage row at the end, none
for a refusal),
finishes the meter as `rejected` or `failed` when the handler raises, and puts the
rate-limit headers on every answer, errors included: as they stood once the request was
admitted (OpenAI's: what is left after its reservation), not after it ran.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import Accounts, NotFoundError, ProductError
from orchestrator.accounts import LOCAL, Identity, Meter
from orchestrator.errors import (
    KeyExpiredError,
    PreconditionFailedError,
    QuotaExceededError,
    RateLimitError,
)
from orchestrator.store import StoreUnavailableError
from server.errors import APIError, shutting_down, store_unavailable_handler

Handler = Callable[[Request, Meter], Awaitable[Response]]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _unauthorized(
    message: str = "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


class DrainGate:
    """While the server drains (after SIGTERM), every new /v1 request is a 503: the drain
    waits only for requests already admitted, so an upload or an indexing job started now
    could be cut off halfway."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1")
            and scope["app"].state.tokenmill.admission.draining
        ):
            await shutting_down().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AuthMiddleware:
    """Every /v1 request gets an identity, or a 401 in OpenAI's shape.

    `--api-key` keys are compared as SHA-256 digests with `hmac.compare_digest`, against
    every configured key without stopping early, so timing reveals neither a key's
    content nor which key matched. Issued keys are found by their digest in the store
    (a revoked one is refused at once, an expired one from its expiry on, with a
    message saying so: nothing is cached)."""

    def __init__(self, app: ASGIApp, api_keys: list[str], accounts: Accounts | None) -> None:
        self.app = app
        self.digests = [_digest(k) for k in api_keys]
        self.accounts = accounts
        # Once a key has been issued the server stays closed (until it restarts, even if
        # every user is deleted): failing closed, and no lookup per request from then on.
        self.closed = bool(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            try:
                found = await self._identity(Headers(scope=scope).get("authorization", ""))
            except KeyExpiredError as exc:
                await _unauthorized(exc.message).response()(scope, receive, send)
                return
            except StoreUnavailableError as exc:  # a middleware: the app's handlers are inside
                refusal = await store_unavailable_handler(Request(scope), exc)
                await refusal(scope, receive, send)
                return
            if found is None:
                await _unauthorized().response()(scope, receive, send)
                return
            scope.setdefault("state", {})["identity"] = found
        await self.app(scope, receive, send)

    async def _identity(self, header: str) -> Identity | None:
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token and self._is_admin_key(token):
            return LOCAL
        if token and self.accounts is not None:
            found = await self.accounts.authenticate(token)
            if found is not None:
                return found
        if not self.closed and self.accounts is not None:
            self.closed = await self.accounts.keys_required()
        return None if self.closed else LOCAL

    def _is_admin_key(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def identity(request: Request) -> Identity:
    """The identity `AuthMiddleware` found (the local user when it does not run)."""
    return request.scope.get("state", {}).get("identity", LOCAL)


def owner(request: Request) -> str:
    """The user a request acts for: every stored object belongs to it."""
    return identity(request).owner


def product_api_error(exc: ProductError) -> APIError:
    """A product error as the API answers it: 404, 412, 429 (quota, rate) or 400."""
    if isinstance(exc, NotFoundError):
        return APIError(404, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, PreconditionFailedError):
        return APIError(412, exc.message, param=exc.param, code=exc.code)
    # OpenAI's SDKs retry a 429 twice (after a second or two) unless told not to: a
    # spent quota, or a request too large for the limit, would only be refused again.
    no_retry = {"x-should-retry": "false"}
    if isinstance(exc, QuotaExceededError):
        return APIError(
            429, exc.message, code="insufficient_quota", type="insufficient_quota", headers=no_retry
        )
    if isinstance(exc, RateLimitError):
        headers = dict(exc.headers)
        if exc.retry_after is None:
            headers.update(no_retry)
        else:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return APIError(429, exc.message, code=exc.code, headers=headers, type=exc.limit)
    return APIError(400, exc.message, param=exc.param, code=exc.code)


Route = Callable[[Request], Awaitable[Response]]


def take_request(request: Request, accounts: Accounts | None) -> dict[str, str]:
    """One request from the caller's rpm bucket, the one the generation routes take from,
    for a route that meters no tokens of its own: an input token count, a vector-store
    search (its query embeddings are metered inside). RateLimitError (the 429) when the
    bucket is empty, which the route raises before reading its body, so a user past the
    limit costs no parsing. Returns the rate-limit headers its answer carries."""
    if accounts is None:
        return {}
    who = identity(request)
    accounts.take_request(who)
    return accounts.rate_headers(who)


def metered(
    endpoint: str, handler: Handler, accounts: Callable[[Request], Accounts | None]
) -> Route:
    """A generation route under rate limits and metering (see the module's docstring)."""

    async def route(request: Request) -> Response:
        who = identity(request)
        found = accounts(request)
        meter = Meter(
            found, endpoint, who, listeners=[request.app.state.tokenmill.metrics.on_usage]
        )
        try:
            if found is not None:
                found.take_request(who)
            response = await handler(request, meter)
        except (APIError, ProductError) as exc:
            error = exc if isinstance(exc, APIError) else product_api_error(exc)
            await meter.finish(meter.error_status(error.status))
            error.headers = {**meter.rate_headers(), **error.headers}
            raise error from None
        except ClientDisconnect:  # gone before its body arrived: nothing was produced
            await meter.finish(meter.stopped_status("incomplete"))
            raise
        except BaseException:
            await meter.finish("failed")
            raise
        response.headers.update(meter.rate_headers())
        return response

    return route
