"""Routes of the Conversations API: parse, call the orchestrator, format JSON."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator.conversations import etag
from server.access import owner
from server.errors import invalid, known_fields
from server.json_body import json_response
from server.responses import product
from server.responses_protocol import (
    MAX_ITEMS_PER_CALL,
    check_query_include,
    parse_items,
    parse_metadata,
    parse_page,
)


def _ids(request: Request) -> tuple[str, str]:
    return owner(request), request.path_params["conversation_id"]


# An entity tag in an If-Match list (RFC 9110 8.8.3): weak ones (W/) never match, as
# If-Match compares strongly, so only the quoted strong tags are kept.
_STRONG_TAG = re.compile(r'(?:^|,)\s*("[^"]*")\s*(?=,|$)')


def _if_match(request: Request) -> frozenset[str] | None:
    """The ETags an update may apply over, as RFC 9110 reads If-Match: absent or `*` (any
    current conversation) is None, no condition; else the list's strong tags, any of which
    matches (a header naming none of ours matches nothing, so its update is a 412)."""
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    return frozenset(_STRONG_TAG.findall(header))


def _tagged(conversation: dict) -> JSONResponse:
    """A conversation with its ETag, which an update's If-Match may name."""
    return JSONResponse(conversation, headers={"ETag": etag(conversation)})


async def create_conversation(request: Request, body: Any) -> Response:
    body = known_fields(body, {"items", "metadata"})
    items = parse_items(body["items"], "items", MAX_ITEMS_PER_CALL) if body.get("items") else []
    metadata = parse_metadata(body.get("metadata"))
    return _tagged(await product(request).conversations.create(owner(request), metadata, items))


async def list_conversations(request: Request) -> Response:
    page = parse_page(request.query_params)
    return JSONResponse(await product(request).conversations.list(owner(request), page))


async def retrieve_conversation(request: Request) -> Response:
    return _tagged(await product(request).conversations.retrieve(*_ids(request)))


async def update_conversation(request: Request, body: Any) -> Response:
    body = known_fields(body, {"metadata"})
    if "metadata" not in body:
        raise invalid("metadata is required", "metadata")
    metadata = parse_metadata(body["metadata"])
    conversations = product(request).conversations
    return _tagged(await conversations.update(*_ids(request), metadata, _if_match(request)))


async def delete_conversation(request: Request) -> Response:
    return JSONResponse(await product(request).conversations.delete(*_ids(request)))


async def create_items(request: Request, body: Any) -> Response:
    body = known_fields(body, {"items"})
    include = check_query_include(request.query_params)
    items = parse_items(body.get("items"), "items", MAX_ITEMS_PER_CALL)
    if not items:  # the answer, a ConversationItemList, names its first and last item
        raise invalid(f"items must hold 1 to {MAX_ITEMS_PER_CALL} items", "items")
    conversations = product(request).conversations
    return JSONResponse(await conversations.add_items(*_ids(request), items, include))


async def list_items(request: Request) -> Response:
    page = parse_page(request.query_params)
    include = check_query_include(request.query_params)
    conversations = product(request).conversations
    return await json_response(await conversations.list_items(*_ids(request), page, include))


async def retrieve_item(request: Request) -> Response:
    include = check_query_include(request.query_params)
    item_id = request.path_params["item_id"]
    conversations = product(request).conversations
    return await json_response(await conversations.retrieve_item(*_ids(request), item_id, include))


async def delete_item(request: Request) -> Response:
    item_id = request.path_params["item_id"]
    return JSONResponse(await product(request).conversations.delete_item(*_ids(request), item_id))
