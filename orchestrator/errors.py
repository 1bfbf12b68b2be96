"""The product's failures a client can cause, independent of HTTP.

The server maps them to OpenAI-shaped errors (404 and 400 naming the field); keeping
them here lets the orchestrator run without the server (benchmarks, tests, a CLI).
"""

from __future__ import annotations


class ProductError(Exception):
    """Base class: `message` is written for the client."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class NotFoundError(ProductError):
    """An id that does not exist for this owner (another owner's objects look the same)."""


class InvalidRequestError(ProductError):
    """A request the product cannot serve as asked: the message names the field."""


class PreconditionFailedError(ProductError):
    """A conditional write (`If-Match`) whose object changed since the client read it:
    the client reads it again and re-applies its change."""


class QuotaExceededError(ProductError):
    """The user's token quota for the period cannot hold this request (OpenAI's 429
    `insufficient_quota`)."""


class StorageQuotaExceededError(ProductError):
    """An upload that would take the user's files past their storage quota (a 400: it
    fits only once files are deleted, so retrying as it is cannot help)."""


class RateLimitError(ProductError):
    """A per-minute limit is reached: retry after `retry_after` seconds (None: the
    request can never fit the limit). `headers` are the x-ratelimit-* headers; `limit`
    is the limit reached, "requests" or "tokens", which OpenAI's 429 gives as its type."""

    def __init__(
        self, message: str, retry_after: float | None, headers: dict[str, str], limit: str
    ):
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after
        self.headers = headers
        self.limit = limit


class KeyExpiredError(ProductError):
    """An issued API key past its expiry: refused as an unknown or revoked key is (a 401),
    with a message that says why, so its holder asks for a new key."""
