"""Reading a request body as JSON, as an untrusted client may send it.

Every way a body can be wrong ends in a 4xx here, before any handler sees it:
- a content type other than `application/json` is a 415, so a web page cannot send a
  body through a "simple" cross-origin request (a form or `text/plain`), which browsers
  send without asking the server first;
- more than the byte limit is a 413, refused as it streams in, never buffered whole;
- text that is not JSON, a number too long for Python to convert (over 4,300 digits),
  nesting deeper than `MAX_JSON_DEPTH`, more than `MAX_JSON_CONTAINERS` arrays and
  objects or `MAX_JSON_VALUES` values, or a string holding a lone UTF-16 surrogate is a 400.

Parsing a large body takes a while (tens of milliseconds per MB of small objects), so
above `OFFLOAD_BYTES` the JSON parse runs in the preparation process
(server/prep_process.py), which has a GIL of its own, and the request's own parse of the
result on a worker thread; small bodies, the common case, are parsed at once and never
queue behind a large one. The shape checks run before the parse: the nesting depth and
the counts are read from the bytes by numpy, and a chat request's message count is
checked before any message is.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
from starlette.requests import Request

from server.errors import APIError, invalid

# Deeper JSON than any OpenAI request needs (tool schemas nest a few levels); beyond it
# a body only exercises recursion in the parser, the templates and the encoders.
MAX_JSON_DEPTH = 64
# More arrays and objects than any request needs (a chat request of as many messages as
# the context window has tokens, each with a list of content parts, stays well below).
MAX_JSON_CONTAINERS = 65_536
# More values than any request needs (an embeddings request of 300,000 token ids, the
# most it may hold, stays below). Parsing 500,000 numbers holds the GIL for ~20 ms.
MAX_JSON_VALUES = 524_288
OFFLOAD_BYTES = 64 * 1024
# Bytes scanned at a time for the shape (json_shape): a chunk's temporary arrays stay in a
# core's cache, which makes the scan twice as fast as one pass over a 7 MB body.
SCAN_CHUNK_BYTES = 64 * 1024
# A \u escape in the surrogate range: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

T = TypeVar("T")


class OffLoop(Protocol):
    """Where a large body's work runs (server.state.ServerState)."""

    async def parse_json(self, body: bytes | bytearray) -> Any: ...

    async def offload(self, fn: Callable[..., T], *args: Any) -> T: ...


def is_json_content_type(header: str) -> bool:
    """`application/json`, with or without parameters such as `charset=utf-8`."""
    return header.split(";", 1)[0].strip().lower() == "application/json"


async def read_json_body(
    request: Request,
    limit: int,
    off_loop: OffLoop,
    parse: Callable[[Any], T] | None = None,
) -> T | Any:
    """The body as JSON, after the content-type and size checks, passed through `parse`
    if given; a large body is parsed in the preparation process and `parse` runs on a
    worker thread (`off_loop`), never on the event loop."""
    if not is_json_content_type(request.headers.get("content-type", "")):
        raise APIError(
            415,
            "the request body must be JSON, sent with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    body = await _read_limited(request, limit)
    if len(body) <= OFFLOAD_BYTES:
        value = parse_json(body)
        return value if parse is None else parse(value)
    value = await off_loop.parse_json(body)
    return value if parse is None else await off_loop.offload(parse, value)


def content_length(request: Request) -> int | None:
    """The declared Content-Length, or None where there is none or it is not a plain
    decimal number (str.isdigit alone takes '²', which int() refuses)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) <= 18:
        return int(declared)
    return None


async def _read_limited(request: Request, limit: int) -> bytearray:
    too_large = APIError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large"
    )
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return body


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259), though Python's parser takes them: a value
    stored from one breaks every later response that has to write it back out."""
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as infinity
        raise json.JSONDecodeError(f"{text} is out of a double's range", text, 0)
    return value


def parse_json(body: bytes | bytearray) -> Any:
    # The shape before the parse, which holds the GIL per value it builds; the scan stops
    # as soon as a limit is passed, so the counts in its message are a lower bound.
    shape = json_shape(body, stop_over_limits=True)
    if shape.depth > MAX_JSON_DEPTH:
        raise _too_deep()
    if shape.over_limits:
        raise invalid(
            f"the request body has at least {shape.containers} JSON arrays and objects and "
            f"about {shape.values} values; this server accepts at most "
            f"{MAX_JSON_CONTAINERS} and {MAX_JSON_VALUES}",
            code="invalid_json",
        )
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except ValueError as exc:  # an integer with more digits than Python converts
        raise invalid(
            f"the request body has a number that is too large: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if _SURROGATE_ESCAPE.search(body) and not _encodable(value):
        raise invalid(
            "the request body has a string with an unpaired surrogate escape "
            "(such as \\ud800), which is not text",
            code="invalid_json",
        )
    return value


def _encodable(value: Any) -> bool:
    """Whether every string in `value` is valid Unicode: JSON's \\u escapes can spell a
    lone UTF-16 surrogate, which Python accepts but no tokenizer or UTF-8 encoder does."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _too_deep() -> APIError:
    return invalid(
        f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
    )


class JsonShape(NamedTuple):
    depth: int  # how deeply arrays and objects nest (a scalar is 0)
    containers: int  # how many arrays and objects there are
    commas: int  # separators between elements and members: about one per value

    @property
    def values(self) -> int:
        """About how many values the parse would build (containers, elements, members)."""
        return self.containers + self.commas

    @property
    def over_limits(self) -> bool:
        return (
            self.depth > MAX_JSON_DEPTH
            or self.containers > MAX_JSON_CONTAINERS
            or self.values > MAX_JSON_VALUES
        )


@dataclass
class _Scan:
    """The scan's state between chunks of the body."""

    in_string: int = 0  # 1 when the chunk starts inside a string
    odd_backslashes: bool = False  # the previous chunk ended in an odd run of backslashes
    depth: int = 0
    deepest: int = 0
    containers: int = 0
    commas: int = 0

    @property
    def shape(self) -> JsonShape:
        return JsonShape(max(0, self.deepest), self.containers, self.commas)


def json_shape(
    body: bytes | bytearray, chunk_bytes: int = SCAN_CHUNK_BYTES, stop_over_limits: bool = False
) -> JsonShape:
    """The nesting depth, containers and commas of a valid JSON text, read from its bytes.

    Vectorised numpy passes are far cheaper than parsing: `json.loads` of 7 MB of 200,000
    small objects takes 80 ms and builds every object, and a walk of the result costs a
    microsecond a container. Checked first, the limits refuse such a body before it is
    parsed. The body is scanned a chunk at a time, so that the temporary arrays stay in
    a core's cache, and with `stop_over_limits` the scan ends at the first chunk that
    passes a limit (returning the shape so far): refusing a 7 MB body of 200,000
    objects then reads its first 2.5 MB."""
    if body[:4].count(0) or body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # UTF-16/32 -> UTF-8; bytes that do not decode (json.loads refuses the body for
        # them) read as U+FFFD, which is no part of the structure
        body = body.decode(json.detect_encoding(body), errors="replace").encode()
    codes = np.frombuffer(body, dtype=np.uint8)
    scan = _Scan()
    for start in range(0, codes.size, chunk_bytes):
        _scan_chunk(codes[start : start + chunk_bytes], scan)
        if stop_over_limits and scan.shape.over_limits:
            break
    return scan.shape


def _scan_chunk(codes: np.ndarray, scan: _Scan) -> None:
    """Only quotes, backslashes, brackets and commas can matter, so after one pass over
    the chunk the work is on those alone. A bracket or comma counts unless it is inside
    a string: a string opens at a quote preceded by an even run of backslashes and closes
    at the next such quote. A run may continue from the previous chunk."""
    folded = codes | 0x20  # "[" and "{" fold to 0x7B, "]" and "}" to 0x7D
    where = np.flatnonzero(
        (codes == ord('"'))
        | (codes == ord("\\"))
        | (codes == ord(","))
        | (folded == 0x7B)
        | (folded == 0x7D)
    )
    carried_run = scan.odd_backslashes
    scan.odd_backslashes = False
    if where.size == 0:
        return
    marks, folded = codes[where], folded[where]
    quotes = marks == ord('"')
    backslashes = marks == ord("\\")
    if backslashes.any() or carried_run:  # a quote after an odd run of backslashes is escaped
        index = np.arange(where.size)
        continues_run = np.zeros(where.size, dtype=bool)
        continues_run[0] = carried_run and where[0] == 0  # counts as one backslash before
        continues_run[1:] = backslashes[:-1] & (np.diff(where) == 1)
        before = index - np.maximum.accumulate(np.where(continues_run, -1, index))
        quotes &= before % 2 == 0
        scan.odd_backslashes = bool(
            backslashes[-1] and where[-1] == codes.size - 1 and before[-1] % 2 == 0
        )
    seen_quotes = np.cumsum(quotes, dtype=np.int32)
    outside = ((seen_quotes + scan.in_string) & 1) == 0
    scan.in_string = (scan.in_string + int(seen_quotes[-1])) & 1
    opens = (folded == 0x7B) & outside
    steps = opens.astype(np.int8) - ((folded == 0x7D) & outside).astype(np.int8)
    levels = np.cumsum(steps, dtype=np.int32)
    scan.deepest = max(scan.deepest, scan.depth + int(levels.max()))
    scan.depth += int(levels[-1])
    scan.containers += int(np.count_nonzero(opens))
    scan.commas += int(np.count_nonzero((marks == ord(",")) & outside))
