"""The web chat page: `/` and its static files (server/static/), and the security headers
every response carries.

The page is plain HTML, CSS and JavaScript modules shipped in the package; it talks to the
server only through the public /v1 APIs, as any other client does (docs/web.md). Its
Content-Security-Policy allows nothing but this origin: no inline script or style, no
remote resource, no plugin, no framing, so even text that slipped into the page as HTML
could not run or load anything. Responses of the API carry a policy that allows nothing at
all (`sandbox` included), so a file served back by `GET /v1/files/{id}/content` (an
uploaded HTML file, say) cannot run script in this origin when a browser opens it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from server.response_headers import ResponseHeadersMiddleware

STATIC_DIR = Path(__file__).resolve().parent / "static"

PAGE_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # code_interpreter's images arrive as data: URLs
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
API_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class SecurityHeadersMiddleware(ResponseHeadersMiddleware):
    """Adds the page's policy to `/` and `/static/*`, the deny-all policy to everything
    else, and `nosniff` / `no-referrer` to all."""

    def prepare(self, scope: Scope) -> Callable[[MutableHeaders], None]:
        policy = PAGE_POLICY if _is_page(scope["path"]) else API_POLICY

        def add(headers: MutableHeaders) -> None:
            headers.setdefault("content-security-policy", policy)
            headers.setdefault("x-content-type-options", "nosniff")
            headers.setdefault("referrer-policy", "no-referrer")

        return add


async def page(request: Request) -> Response:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"cache-control": "no-cache"},
    )


def web_routes() -> list[BaseRoute]:
    """`/` (the page) and `/static/*` (its scripts and styles)."""
    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
