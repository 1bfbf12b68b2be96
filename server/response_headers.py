"""The base of the middlewares that only add headers to HTTP responses."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ResponseHeadersMiddleware:
    """Pure ASGI: `prepare` sees the request and returns what to do to the response's
    headers; only the response's start message is edited, so streamed responses pass
    through unbuffered (Starlette's BaseHTTPMiddleware would buffer its own way)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def prepare(self, scope: Scope) -> Callable[[MutableHeaders], None]:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        edit = self.prepare(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                edit(MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_with_headers)
