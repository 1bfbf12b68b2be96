"""Items as stored and returned: ids, status, and the list pages both APIs return."""

from __future__ import annotations

from collections.abc import Collection

from orchestrator.context import FILE_TEXT
from orchestrator.events import hide_logprobs
from orchestrator.ids import new_id
from orchestrator.response_request import FILE_SEARCH_RESULTS, OUTPUT_TEXT_LOGPROBS
from orchestrator.store import ItemPage

_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "code_interpreter_call": "ci",
    "file_search_call": "fs",
}


def stored_item(item: dict) -> dict:
    """A client's input item (already validated) with an id of its own and the status it
    was given (a failed run given back stays failed, an incomplete message incomplete),
    completed when it was given none."""
    return {"id": new_id(_PREFIXES[item["type"]]), "status": "completed", **item}


def readable(items: list[dict], include: Collection[str] = ()) -> list[dict]:
    """`items` as every read of items shows them (changed in place): their output_text
    logprobs and file_search_call results only when `include` asks for them, as their
    creation had to (OpenAI's "additional fields to include"), and an input_file part as
    given, without the text the server read from its file."""
    if OUTPUT_TEXT_LOGPROBS not in include:
        hide_logprobs(items)
    if FILE_SEARCH_RESULTS not in include:
        for item in items:
            if item.get("type") == "file_search_call":
                item["results"] = None
    return without_file_text(items)


def without_file_text(items: list[dict]) -> list[dict]:
    """`items` (changed in place) without the text read from their input_file parts."""
    for item in items:
        if item.get("type") == "message":
            for part in item["content"]:
                part.pop(FILE_TEXT, None)
    return items


def item_list(page: ItemPage) -> dict:
    """OpenAI's cursor-page object; `after=last_id` asks for the next page."""
    items = page.items
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": page.has_more,
    }
