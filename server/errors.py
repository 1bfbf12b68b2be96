"""OpenAI-shaped errors.

Every failure a client can cause is raised as `APIError` and rendered as
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, because the
OpenAI SDKs map the status to an exception class and read these four fields; an
unshaped 500 would surface as a confusing "internal server error" for what was a
typo in the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

# The `type` OpenAI uses for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    412: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "requests",  # a limit on requests; a token limit's 429 says "tokens", a quota's its own
    500: "server_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """A request that cannot be served, with everything needed to answer it."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # OpenAI's `type` when it is not the status's usual one (`insufficient_quota`).
    type: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __reduce__(self) -> tuple:
        """Rebuilt from its fields: it crosses from the preparation process
        (server.prep_process), and an exception unpickles from `args` by default."""
        fields = (self.status, self.message, self.param, self.code, self.headers, self.type)
        return (type(self), fields)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type or _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """The common case: a 400 about one request field."""
    return APIError(400, message, param=param, code=code)


def known_fields(body: object, fields: set[str] | frozenset[str], param: str = "") -> dict:
    """The body, a JSON object whose fields set (not null) are all among `fields`; a 400
    naming the first that is not (under `param`, for an object nested in a body): as
    OpenAI's API, the product's routes refuse a field they would otherwise ignore."""
    if not isinstance(body, dict):
        if param:
            raise invalid(f"{param} must be an object", param)
        raise invalid("the request body must be a JSON object")
    for name in body:
        if name not in fields and body[name] is not None:
            named = f"{param}.{name}" if param else name
            raise invalid(f"{named} is not supported by this server", named)
    return body


# What `typed_field`'s kinds accept (bool is no number, though Python's is an int).
KINDS: dict[str, tuple[type, ...]] = {
    "a string": (str,),
    "a boolean": (bool,),
    "an integer": (int,),
    "a number": (int, float),
    "an object": (dict,),
    "an array": (list,),
}


def typed_field(
    body: dict, name: str, kind: str, default: Any = None, param: str | None = None
) -> Any:
    """body[name] if present and not null, checked against `kind` (bool is not a number); a
    400 naming `param` (default: `name`) otherwise. Every request parser checks fields here."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, KINDS[kind])
    if kind in ("an integer", "a number") and isinstance(value, bool):
        ok = False
    if not ok:
        raise invalid(f"{param or name} must be {kind}, got {value!r}", param=param or name)
    return value


def from_value_error(exc: ValueError) -> APIError:
    """Turn a validation `ValueError("<param> must ...")` into a 400 naming that param.

    The engine's `SamplingParams` words its messages this way on purpose, so the
    server need not duplicate the engine's range rules to report the right field.
    """
    message = str(exc)
    first = message.split(" ", 1)[0]
    param = first if first.isidentifier() and " must " in message else None
    return invalid(message, param=param)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


# How long a client turned away by a draining server should wait: the drain lasts up to
# --shutdown-timeout (30 s by default), then a supervisor restarts the process, which loads
# the model for tens of seconds. 30 s spans a typical restart, and stays within the 120 s
# the OpenAI SDKs honour (beyond it they give up instead of retrying).
SHUTDOWN_RETRY_AFTER_S = 30


def shutting_down(
    message: str = "the server is shutting down", code: str = "server_shutting_down"
) -> APIError:
    """A 503 from a draining server, saying when a restarted one should answer: to a new
    request (the defaults), and to one still running when the drain ran out
    (server.generation, `server_shutdown`), which waits for the same restart."""
    return APIError(503, message, code=code, headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)})


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """A client that closed its connection before its request's body arrived: nobody
    reads an answer, and it is not the server's error (logged as one, it would page an
    operator). 499, nginx's "client closed request", is what the access log shows."""
    return Response(status_code=499)


async def store_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """The database did not answer: a 503 the client may retry, in OpenAI's shape,
    instead of Starlette's plain-text 500 and a traceback. (Also the answer of the key
    check, `server.access.AuthMiddleware`, which runs outside the app's handlers.)"""
    log.error("the database did not answer %s %s: %s", request.method, request.url.path, exc)
    return APIError(
        503,
        "the server's database is unreachable; retry later",
        code="database_unavailable",
        headers={"Retry-After": "5"},
    ).response()


async def server_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Any other failure: a 500 in OpenAI's shape (Starlette still logs its traceback),
    which every SDK can read, not Starlette's plain text. The message and the log name
    the request's id, so a user's report leads the operator to the traceback."""
    rid = request.scope.get("state", {}).get("request_id")
    log.error("request %s failed: %s: %s", rid, type(exc).__name__, exc)
    if rid is None:
        return APIError(500, "the server failed on this request", code="server_error").response()
    # Starlette answers a 500 outside every middleware, so the id's header is set here.
    message = f"the server failed on this request (request id {rid})"
    return APIError(500, message, code="server_error", headers={"x-request-id": rid}).response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 (unknown route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    # Starlette's 405 carries the route's `Allow` header, which HTTP requires on a 405.
    headers = dict(exc.headers or {})
    return APIError(exc.status_code, str(exc.detail), code=code, headers=headers).response()
