"""Routes of the Vector Stores API: stores, their files, and search. Bodies are parsed
here (400 naming the field); the orchestrator's `VectorStoreService` does the work."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator import VectorStoreService
from orchestrator.items import item_list
from orchestrator.retrieval.chunking import parse_chunking_strategy
from orchestrator.retrieval.filters import MAX_KEY_LENGTH, is_number
from orchestrator.vector_stores import FileToAdd, Search
from server.access import owner, take_request
from server.errors import APIError, invalid, known_fields, typed_field
from server.request_body import read_json_body
from server.responses import product
from server.responses_protocol import parse_metadata, parse_page
from server.state import ServerState
from server.vector_store_search import parse_search_request, search_results_page

MAX_FILE_IDS = 500  # a store's `file_ids` when it is created
MAX_BATCH_FILES = 2000  # a file batch's `file_ids` or `files`, as OpenAI's
MAX_DESCRIPTION = 512
MAX_EXPIRY_DAYS = 365
STATUSES = ("in_progress", "completed", "failed", "cancelled")


def _service(request: Request) -> VectorStoreService:
    found = product(request)
    if found.vector_stores is None:
        raise APIError(501, found.vector_stores_unavailable(), code="not_supported")
    return found.vector_stores


def _name(body: dict) -> str | None:
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("name must be a string", "name")
    return name


def _expires_after(value: Any) -> dict | None:
    """OpenAI's expiration policy: `{"anchor": "last_active_at", "days": 1..365}`, or
    null for none."""
    param = "expires_after"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object with anchor and days, or null", param)
    for key in value:
        if key not in ("anchor", "days"):
            raise invalid(f"{param}.{key} is not a field of {param}", f"{param}.{key}")
    if value.get("anchor") != "last_active_at":
        raise invalid(f"{param}.anchor must be 'last_active_at'", f"{param}.anchor")
    days = value.get("days")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_EXPIRY_DAYS:
        raise invalid(
            f"{param}.days must be an integer from 1 to {MAX_EXPIRY_DAYS}", f"{param}.days"
        )
    return {"anchor": "last_active_at", "days": days}


def _chunking(body: dict, param: str = "chunking_strategy"):
    try:
        return parse_chunking_strategy(body.get("chunking_strategy"))
    except ValueError as exc:
        raise invalid(str(exc), param) from None


def _attribute_fits(key: str, value: Any) -> bool:
    """OpenAI's limits: keys of at most 64 characters; values strings of at most 512,
    booleans or numbers (here an integer must fit in 64 bits, which filters can compare).
    No key or string holds a NUL: the chunks' copy of the attributes is PostgreSQL's
    `jsonb`, which cannot store one."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH or "\x00" in key:
        return False
    if isinstance(value, str):
        return len(value) <= 512 and "\x00" not in value
    return isinstance(value, bool) or is_number(value)


def _attributes(body: dict, param: str = "attributes") -> dict:
    attributes = body.get("attributes") or {}
    if (
        not isinstance(attributes, dict)
        or len(attributes) > 16
        or not all(_attribute_fits(k, v) for k, v in attributes.items())
    ):
        raise invalid(
            "attributes must be an object of at most 16 keys of 1 to 64 characters, whose "
            "values are strings of at most 512 characters, booleans or numbers (an integer "
            "must fit in 64 bits); no key or string may hold a NUL character",
            param,
        )
    return attributes


def _file_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"{param} must be a file id string", param)
    return value


def _distinct_file_ids(values: list) -> list[str]:
    """The ids of a `file_ids` array in order, each once; every entry checked first (an
    object or array in it is a client's mistake, not something to hash)."""
    return list(dict.fromkeys([_file_id(v, "file_ids") for v in values]))


async def create_vector_store(request: Request, body: Any) -> Response:
    fields = {"name", "description", "metadata", "file_ids", "chunking_strategy", "expires_after"}
    body = known_fields(body, fields)
    description = typed_field(body, "description", "a string")
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise invalid(f"description may be at most {MAX_DESCRIPTION} characters", "description")
    expires_after = _expires_after(body.get("expires_after"))
    file_ids = body.get("file_ids") or []
    if not isinstance(file_ids, list) or len(file_ids) > MAX_FILE_IDS:
        raise invalid(f"file_ids must be an array of at most {MAX_FILE_IDS} file ids", "file_ids")
    chunking = _chunking(body)
    files = [FileToAdd(f, chunking, {}, "file_ids") for f in _distinct_file_ids(file_ids)]
    return JSONResponse(
        await _service(request).create(
            owner(request),
            _name(body),
            parse_metadata(body.get("metadata")),
            files,
            description,
            expires_after,
        )
    )


async def list_vector_stores(request: Request) -> Response:
    page = parse_page(request.query_params)
    return JSONResponse(item_list(await _service(request).list(owner(request), page)))


def _store_id(request: Request) -> str:
    return request.path_params["vector_store_id"]


async def retrieve_vector_store(request: Request) -> Response:
    return JSONResponse(await _service(request).retrieve(owner(request), _store_id(request)))


async def update_vector_store(request: Request, body: Any) -> Response:
    body = known_fields(body, {"name", "metadata", "expires_after"})
    changes: dict = {}
    if "name" in body:
        changes["name"] = _name(body)
    if "metadata" in body:
        changes["metadata"] = parse_metadata(body["metadata"])
    if "expires_after" in body:
        changes["expires_after"] = _expires_after(body["expires_after"])
    return JSONResponse(await _service(request).update(owner(request), _store_id(request), changes))


async def delete_vector_store(request: Request) -> Response:
    return JSONResponse(await _service(request).delete(owner(request), _store_id(request)))


async def search_vector_store(request: Request) -> Response:
    """A search is one request of the user's rpm, taken before its body is read; its
    queries' embeddings are metered and charged as `vector_stores.search` usage."""
    headers = take_request(request, product(request).accounts)
    state: ServerState = request.app.state.tokenmill
    body = await read_json_body(request, state.config.max_body_bytes, state)
    options = parse_search_request(body)
    searches = [
        Search(
            q,
            options.filters,
            options.max_num_results,
            options.score_threshold,
            options.mode,
            options.weights,
        )
        for q in options.queries
    ]
    hits = await _service(request).search_stores(owner(request), [_store_id(request)], searches)
    return JSONResponse(search_results_page(options.queries, hits), headers=headers)


async def create_store_file(request: Request, body: Any) -> Response:
    body = known_fields(body, {"file_id", "chunking_strategy", "attributes"})
    file_id = _file_id(body.get("file_id"), "file_id")
    file = FileToAdd(file_id, _chunking(body), _attributes(body), "file_id")
    return JSONResponse(await _service(request).add_file(owner(request), _store_id(request), file))


async def list_store_files(request: Request) -> Response:
    status = request.query_params.get("filter")
    if status is not None and status not in STATUSES:
        raise invalid(f"filter must be one of {', '.join(STATUSES)}", "filter")
    page = parse_page(request.query_params)
    return JSONResponse(
        item_list(
            await _service(request).list_files(owner(request), _store_id(request), page, status)
        )
    )


async def retrieve_store_file(request: Request) -> Response:
    return JSONResponse(
        await _service(request).retrieve_file(
            owner(request), _store_id(request), request.path_params["file_id"]
        )
    )


async def update_store_file(request: Request, body: Any) -> Response:
    body = known_fields(body, {"attributes"})
    if "attributes" not in body:  # required, but null (as the SDK's type allows) clears them
        raise invalid("attributes is required", "attributes")
    return JSONResponse(
        await _service(request).update_file(
            owner(request), _store_id(request), request.path_params["file_id"], _attributes(body)
        )
    )


async def store_file_content(request: Request) -> Response:
    return JSONResponse(
        await _service(request).file_content(
            owner(request), _store_id(request), request.path_params["file_id"]
        )
    )


async def delete_store_file(request: Request) -> Response:
    return JSONResponse(
        await _service(request).delete_file(
            owner(request), _store_id(request), request.path_params["file_id"]
        )
    )


# -- file batches ----------------------------------------------------------------------------


def _batch_files(body: dict) -> list[FileToAdd]:
    """`file_ids` (with the batch's `attributes` and `chunking_strategy`) or `files`
    (each with its own), one of the two."""
    if (body.get("file_ids") is None) == (body.get("files") is None):
        raise invalid("give either file_ids or files", "file_ids")
    if body.get("file_ids") is not None:
        file_ids = body["file_ids"]
        if not isinstance(file_ids, list) or not file_ids or len(file_ids) > MAX_BATCH_FILES:
            raise invalid(
                f"file_ids must be an array of 1 to {MAX_BATCH_FILES} file ids", "file_ids"
            )
        chunking, attributes = _chunking(body), _attributes(body)
        return [
            FileToAdd(f, chunking, attributes, "file_ids") for f in _distinct_file_ids(file_ids)
        ]
    if body.get("attributes") is not None or body.get("chunking_strategy") is not None:
        raise invalid("with files, give attributes and chunking_strategy per file", "files")
    entries = body["files"]
    if not isinstance(entries, list) or not entries or len(entries) > MAX_BATCH_FILES:
        raise invalid(f"files must be an array of 1 to {MAX_BATCH_FILES} objects", "files")
    added: dict[str, FileToAdd] = {}
    for i, entry in enumerate(entries):
        where = f"files[{i}]"
        entry = known_fields(entry, {"file_id", "attributes", "chunking_strategy"}, where)
        param = f"{where}.file_id"
        file_id = _file_id(entry.get("file_id"), param)
        chunking = _chunking(entry, f"{where}.chunking_strategy")
        attributes = _attributes(entry, f"{where}.attributes")
        added[file_id] = FileToAdd(file_id, chunking, attributes, param)
    return list(added.values())


def _batch_id(request: Request) -> str:
    return request.path_params["batch_id"]


async def create_file_batch(request: Request, body: Any) -> Response:
    body = known_fields(body, {"file_ids", "files", "attributes", "chunking_strategy"})
    return JSONResponse(
        await _service(request).create_file_batch(
            owner(request), _store_id(request), _batch_files(body)
        )
    )


async def retrieve_file_batch(request: Request) -> Response:
    return JSONResponse(
        await _service(request).retrieve_file_batch(
            owner(request), _store_id(request), _batch_id(request)
        )
    )


async def cancel_file_batch(request: Request) -> Response:
    return JSONResponse(
        await _service(request).cancel_file_batch(
            owner(request), _store_id(request), _batch_id(request)
        )
    )


async def list_batch_files(request: Request) -> Response:
    status = request.query_params.get("filter")
    if status is not None and status not in STATUSES:
        raise invalid(f"filter must be one of {', '.join(STATUSES)}", "filter")
    page = parse_page(request.query_params)
    return JSONResponse(
        item_list(
            await _service(request).list_batch_files(
                owner(request), _store_id(request), _batch_id(request), page, status
            )
        )
    )
