"""A conformance checker for `/v1/responses` against the Open Responses specification and
the OpenAI SDK's types, generic over any request: it reads a stream as a client does
(the raw Server-Sent Events) and asserts the spec's invariants on every event.

- Every event parses into the SDK's `ResponseStreamEvent` union (validated, not
  constructed), and the SSE `event:` name is its `type`.
- `sequence_number` runs from 0 (or from a resume's `starting_after` + 1) up by one.
- The stream begins `response.created`, [`response.queued`], `response.in_progress`, and
  ends with exactly one terminal event (`response.completed` / `incomplete` / `failed`)
  whose response status agrees with it.
- Items: `output_item.added` announces output index `len(output so far)`, `in_progress`;
  every later event of the item names the same `output_index` and `item_id`; a message's
  content parts open with `content_part.added` at the next `content_index`, their deltas
  add up to `output_text.done`'s text and `content_part.done`'s part; a function call's
  argument deltas add up to `function_call_arguments.done`'s; nothing follows an item's
  `output_item.done`; every item is done before the terminal event.
- Each `*.done` event's item or part equals that item's or part in the final response,
  whose `output` is exactly the done items in order, and the final response equals
  `GET /v1/responses/{id}` (when stored).
- The response object: every field the spec requires, `usage` with its details and
  `total_tokens`, `incomplete_details` exactly when the status is `incomplete` (and for
  `max_output_tokens` a cut), `error` exactly when `failed`, an `incomplete` item only
  last and only in an incomplete response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

EVENT = TypeAdapter(ResponseStreamEvent)
TERMINAL = {
    "response.completed": ("completed",),
    "response.incomplete": ("incomplete", "cancelled"),
    "response.failed": ("failed",),
}
# The fields the Open Responses spec's ResponseResource requires.
REQUIRED_FIELDS = (
    "id", "object", "created_at", "completed_at", "status", "incomplete_details", "model",
    "previous_response_id", "instructions", "output", "error", "tools", "tool_choice",
    "truncation", "parallel_tool_calls", "text", "top_p", "presence_penalty",
    "frequency_penalty", "top_logprobs", "temperature", "reasoning", "user", "usage",
    "max_output_tokens", "max_tool_calls", "store", "background", "service_tier", "metadata",
    "safety_identifier", "prompt_cache_key",
)  # fmt: skip


def read_stream(response: httpx.Response) -> list[dict]:
    """The events of an SSE answer as a client reads them (`_events`)."""
    return list(_events(response))


def _events(response: httpx.Response) -> Iterator[dict]:
    """Each event of an SSE answer, checking that its `event:` name is the payload's
    `type` and that every `data:` line is a JSON event (no `[DONE]`, which OpenAI's
    Responses streams do not send)."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            event = json.loads(line[len("data: ") :])
            assert name == event["type"], (name, event)
            yield event
            name = None


def check_response(body: dict) -> Response:
    """A response object as the spec and the SDK have it."""
    missing = [name for name in REQUIRED_FIELDS if name not in body]
    assert not missing, f"response lacks {missing}"
    response = Response.model_validate(body)
    status = body["status"]
    if status in ("completed", "incomplete", "failed", "cancelled"):
        usage = body["usage"]
        assert usage is not None, body
        assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
        assert usage["input_tokens_details"]["cached_tokens"] <= usage["input_tokens"]
        assert usage["output_tokens_details"]["reasoning_tokens"] == 0
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert (body["completed_at"] is not None) == (status == "completed"), body
    assert (body["error"] is not None) == (status == "failed"), body
    if body["error"] is not None:
        assert set(body["error"]) == {"code", "message"}, body["error"]
    if body["incomplete_details"] is not None:
        assert status == "incomplete" and body["incomplete_details"]["reason"], body
    statuses = [item.get("status") for item in body["output"]]
    if "incomplete" in statuses:
        assert status in ("incomplete", "cancelled", "failed"), body
        assert statuses.index("incomplete") == len(statuses) - 1, statuses
    if status == "completed":  # a built-in tool's call may have failed, but nothing is cut
        assert not {"in_progress", "incomplete"} & set(statuses), statuses
    return response


@dataclass
class _Item:
    index: int
    item: dict
    text: list[str] = field(default_factory=list)  # per content part, the deltas so far
    open_part: int | None = None
    arguments: str = ""
    done: dict | None = None
    parts_done: dict[int, dict] = field(default_factory=dict)


@dataclass
class StreamReport:
    events: list[dict]
    final: dict  # the terminal event's response


def check_stream(events: list[dict], after: int = -1) -> StreamReport:
    """Assert the spec's invariants over one stream's events (a resumed stream's:
    those after `after`, from wherever the stream was picked up)."""
    assert events, "no events"
    for event in events:
        EVENT.validate_python(event)
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(after + 1, after + 1 + len(events))), numbers
    kinds = [e["type"] for e in events]
    terminal = [i for i, k in enumerate(kinds) if k in TERMINAL]
    assert terminal == [len(events) - 1], kinds
    if after < 0:
        assert kinds[0] == "response.created", kinds
        start = kinds[1:3] if kinds[1] == "response.queued" else kinds[1:2]
        assert start[-1] == "response.in_progress", kinds
    final = events[-1]["response"]
    assert final["status"] in TERMINAL[kinds[-1]], (kinds[-1], final["status"])
    check_response(final)
    response_id = final["id"]
    items: dict[str, _Item] = {}
    by_index: dict[int, _Item] = {}
    for event in events:
        kind = event["type"]
        if "response" in event:
            assert event["response"]["id"] == response_id
            check_response(event["response"])
            status = event["response"]["status"]
            if kind == "response.created":
                assert status in ("queued", "in_progress"), status
            elif kind in ("response.queued", "response.in_progress"):
                assert status == kind.removeprefix("response."), (kind, status)
            continue
        if kind == "error":
            raise AssertionError(f"error event: {event}")
        _item_event(event, items, by_index, resumed=after >= 0)
    for state in items.values():
        assert state.done is not None, f"item {state.item['id']} never done"
    done = [by_index[i].done for i in sorted(by_index)]
    if after < 0:
        assert sorted(by_index) == list(range(len(final["output"]))), sorted(by_index)
        assert final["output"] == done, "the done items are not the final output"
    else:
        for index, state in by_index.items():
            assert final["output"][index] == state.done
    for state in items.values():
        for c, part in state.parts_done.items():
            assert final["output"][state.index]["content"][c] == part
    return StreamReport(events, final)


def _item_event(
    event: dict, items: dict[str, _Item], by_index: dict[int, _Item], resumed: bool
) -> None:
    kind = event["type"]
    if kind == "response.output_item.added":
        item = event["item"]
        index = event["output_index"]
        assert item["id"] not in items and index not in by_index
        if not resumed:
            assert index == len(by_index), (index, len(by_index))
        # An item the server makes whole (a built-in function's output) is added done.
        assert item.get("status") in ("in_progress", "completed"), item
        if item["type"] == "message":
            assert item["content"] == [] and item["role"] == "assistant", item
        state = _Item(index, item)
        items[item["id"]] = by_index[index] = state
        return
    item_id = event["item"]["id"] if kind == "response.output_item.done" else event["item_id"]
    if item_id not in items and resumed:
        return  # an item announced before the resume's point
    state = items[item_id]
    assert event["output_index"] == state.index, (event, state.index)
    assert state.done is None, f"{kind} after the item was done"
    if kind == "response.content_part.added":
        assert state.open_part is None and event["content_index"] == len(state.text)
        assert event["part"]["type"] == "output_text" and event["part"]["text"] == ""
        state.open_part = event["content_index"]
        state.text.append("")
    elif kind in ("response.output_text.delta", "response.output_text.done"):
        assert event["content_index"] == state.open_part, event
        if kind.endswith("delta"):
            state.text[-1] += event["delta"]
        else:
            assert event["text"] == state.text[-1], (event["text"], state.text[-1])
    elif kind == "response.output_text.annotation.added":
        assert event["content_index"] == state.open_part, event
    elif kind == "response.content_part.done":
        assert event["content_index"] == state.open_part, event
        assert event["part"]["text"] == state.text[-1]
        state.parts_done[state.open_part] = event["part"]
        state.open_part = None
    elif kind == "response.function_call_arguments.delta":
        state.arguments += event["delta"]
    elif kind == "response.function_call_arguments.done":
        assert event["arguments"] == state.arguments
    elif kind == "response.output_item.done":
        assert state.open_part is None, "item done with a content part open"
        item = event["item"]
        assert item["type"] == state.item["type"] and item["status"] != "in_progress", item
        if state.item["status"] == "completed":
            assert item == state.item, "an item added completed changed before its done"
        if item["type"] == "message":
            assert [p["text"] for p in item["content"]] == state.text
            assert all(item["content"][c] == p for c, p in state.parts_done.items())
        if item["type"] == "function_call":
            assert item["arguments"] == state.arguments
            assert item["call_id"] == state.item["call_id"]
        state.done = item


def _get(base_url: str, path: str, headers: dict, **params) -> httpx.Response:
    return httpx.get(f"{base_url}{path}", headers=headers, params=params, timeout=60)


def _include(body: dict) -> dict:
    """A GET's include that reads a response as its create's `include` wrote it."""
    return {"include[]": body["include"]} if body.get("include") else {}


def stream_response(base_url: str, body: dict, headers: dict | None = None) -> StreamReport:
    """POST /v1/responses `body` as a stream, check its events, and check that the final
    response is what a GET reads (a stored one) or a 404 (`store: false`)."""
    headers = headers or {}
    request = {**body, "stream": True}
    with httpx.stream(
        "POST", f"{base_url}/responses", json=request, headers=headers, timeout=120
    ) as answer:
        report = check_stream(read_stream(answer))
    read = _get(base_url, f"/responses/{report.final['id']}", headers, **_include(body))
    if body.get("store", True):
        assert read.status_code == 200 and read.json() == report.final
    else:
        assert read.status_code == 404, read.text
    return report


def create_response(base_url: str, body: dict, headers: dict | None = None) -> dict:
    """POST /v1/responses `body` without streaming: a conforming response, the one a GET
    reads when it is stored."""
    headers = headers or {}
    answer = httpx.post(f"{base_url}/responses", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    created = answer.json()
    check_response(created)
    if body.get("store", True) and not body.get("background"):
        read = _get(base_url, f"/responses/{created['id']}", headers, **_include(body))
        assert read.json() == created
    return created


def resume_background_stream(
    base_url: str, body: dict, split: int, headers: dict | None = None
) -> StreamReport:
    """Stream a background response, leave after `split` events, and pick the stream up
    with `starting_after`: the events joined are one conforming stream, the resumed part
    conforms from its point, and a replay from the start is the same events."""
    headers = headers or {}
    request = {**body, "background": True, "stream": True}
    with httpx.stream(
        "POST", f"{base_url}/responses", json=request, headers=headers, timeout=120
    ) as answer:
        first = []
        for event in _events(answer):
            first.append(event)
            if len(first) == split:
                break
    response_id = first[0]["response"]["id"]
    after = first[-1]["sequence_number"]
    path = f"{base_url}/responses/{response_id}"
    query = {"stream": "true", "starting_after": after}
    with httpx.stream("GET", path, params=query, headers=headers, timeout=120) as answer:
        rest = read_stream(answer)
    check_stream(rest, after=after)
    whole = check_stream(first + rest)
    with httpx.stream("GET", path, params={"stream": "true"}, headers=headers, timeout=120) as a:
        assert read_stream(a) == whole.events
    assert whole.final["background"] is True
    assert _get(base_url, f"/responses/{response_id}", headers, **_include(body)).json() == (
        whole.final
    )
    return whole
