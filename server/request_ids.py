"""One id per HTTP request, sent back as `x-request-id` on every response.

OpenAI's API answers every request, errors included, with an `x-request-id` header; its
SDKs expose it (`response._request_id`, `APIError.request_id`) so that a user reporting a
failure can name the request, and the operator can find it in the server's log. A client
that sends its own `X-Request-Id` (as vLLM's clients do) gets that id back; otherwise the
server makes one (`req_` and 32 hex digits)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Scope

from server.response_headers import ResponseHeadersMiddleware
from server.vllm_fields import MAX_REQUEST_ID_CHARS

HEADER = "x-request-id"
# Visible ASCII only: the id is written back into a header and into log lines.
_CLIENT_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware(ResponseHeadersMiddleware):
    """Gives each HTTP request its id (the client's `X-Request-Id` when it is 1 to
    MAX_REQUEST_ID_CHARS visible ASCII characters, else a new one), keeps it in the
    request's state and adds it to the response's headers."""

    def prepare(self, scope: Scope) -> Callable[[MutableHeaders], None]:
        given = Headers(scope=scope).get(HEADER)
        rid = given if given is not None and _CLIENT_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        def add(headers: MutableHeaders) -> None:
            headers[HEADER] = rid

        return add
