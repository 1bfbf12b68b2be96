"""JSON answers whose encoding would stall the event loop: encoded on a worker thread,
in pieces.

A thread alone does not spare the loop: `json.dumps` runs in C and holds the GIL from
start to end (a response of 16,000 tokens with 20 `top_logprobs` each, 21 MB, holds it
for 0.5 s on a worker thread as on the loop). Encoded piece by piece, each piece a
`json.dumps` of a subtree of at most `PIECE_NODES` containers and values, the thread
gives the GIL back between pieces (every `sys.getswitchinterval()`, 5 ms), so the loop's
other streams go on. Small bodies are encoded inline, as the thread hop costs more
(50-100 us) than their encoding.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

# A body of fewer containers and values than this is encoded inline: some 100 us at most.
INLINE_NODES = 2_000
# The largest subtree encoded in one `json.dumps` on the worker thread, holding the GIL.
PIECE_NODES = 2_000


def _exceeds(value: Any, limit: int) -> bool:
    """Whether `value` holds more than `limit` containers and values, counted up to the
    first `limit` + 1: its cost is bounded by `limit`, however large the value."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(v for v in item.values() if isinstance(v, (dict, list, tuple)))
        elif isinstance(item, (list, tuple)):
            count += len(item)
            stack.extend(v for v in item if isinstance(v, (dict, list, tuple)))
        else:
            count += 1
        if count > limit:
            return True
    return False


def _dumps(value: Any) -> str:
    """Starlette's `JSONResponse` encoding (compact, UTF-8 kept, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _encode(value: Any, out: list[str]) -> None:
    """Append `value`'s JSON to `out`: a small subtree (or an object with a key that is not
    a string, which `json.dumps` converts) in one piece, a large one member by member."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if not _exceeds(value, PIECE_NODES):
            out.append(_dumps(value))
            return
        out.append("{")
        for i, (key, member) in enumerate(value.items()):
            out.append(("," if i else "") + _dumps(key) + ":")
            _encode(member, out)
        out.append("}")
    elif isinstance(value, (list, tuple)) and _exceeds(value, PIECE_NODES):
        out.append("[")
        for i, member in enumerate(value):
            if i:
                out.append(",")
            _encode(member, out)
        out.append("]")
    else:
        out.append(_dumps(value))


def encode_json(content: Any) -> bytes:
    """`content` as `JSONResponse` renders it, encoded in pieces of at most `PIECE_NODES`."""
    out: list[str] = []
    _encode(content, out)
    return "".join(out).encode("utf-8")


async def json_response(
    content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """`JSONResponse(content, ...)`, a large body encoded on a worker thread in pieces, so
    the event loop (every other stream) runs on meanwhile."""
    if _exceeds(content, INLINE_NODES):
        body = await asyncio.to_thread(encode_json, content)
    else:
        body = _dumps(content).encode("utf-8")
    return Response(body, status_code, headers, media_type="application/json")
