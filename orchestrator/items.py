"""Items as stored and returned: ids, status, and the list pages both APIs return."""

from __future__ import annotations

from orchestrator.ids import new_id
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
