"""The Responses streaming events of one turn, and the response object they build.

`ResponseEvents` is the single source of a response's state: each method changes the
response object and returns the events that describe the change, numbered by
`sequence_number`. Streaming sends those events; storing writes `response` as the
events left it, so a stream and a later `GET /v1/responses/{id}` always agree.

Order for a text answer: response.created, (response.queued, for a background response
waiting for its place, then) response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta…,
response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete / response.failed). A function call is an
output item of its own with response.function_call_arguments.delta/.done events.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from orchestrator.ids import new_id
from orchestrator.tool_parser import ParsedCall

Event = dict[str, Any]

# Terminal status -> the event that announces it.
_FINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",
    "failed": "response.failed",
}


def output_text_part(
    text: str, annotations: list[dict] | None = None, logprobs: list[dict] | None = None
) -> dict:
    return {
        "type": "output_text",
        "text": text,
        "annotations": list(annotations or []),
        "logprobs": copy.deepcopy(logprobs or []),
    }


def event_logprobs(logprobs: list[dict]) -> list[dict]:
    """Content logprobs as the output_text delta and done events carry them: the OpenAI
    SDK's event `Logprob` has no `bytes` (the content part's has)."""
    return [
        {
            "token": lp["token"],
            "logprob": lp["logprob"],
            "top_logprobs": [
                {"token": t["token"], "logprob": t["logprob"]} for t in lp["top_logprobs"]
            ],
        }
        for lp in logprobs
    ]


def hide_logprobs(items: list[dict]) -> None:
    """Empty the logprobs of the output_text parts of `items` (in place): a stored
    response or item shows them only when a read's `include` asks for them, as
    its creation's had to."""
    for item in items:
        if item.get("type") == "message":
            for part in item.get("content", ()):
                if part.get("logprobs"):
                    part["logprobs"] = []


def snapshot(response: dict) -> dict:
    """A copy of a response that the events still to come leave as it is, made
    without copying its token logprobs. A long answer's logprobs (with `top_logprobs`)
    run to hundreds of thousands of objects, which a deep copy on every GET of a
    running response (a page polls one every 1.5 s) copied again each time, on the
    event loop. The events only append entries to a part's `logprobs` list and never
    change one, so the copy gets a list of its own holding the same entries."""
    return {k: _items(v) if k == "output" else copy.deepcopy(v) for k, v in response.items()}


def _items(items: list[dict]) -> list[dict]:
    return [
        {
            k: _parts(v) if k == "content" and item.get("type") == "message" else copy.deepcopy(v)
            for k, v in item.items()
        }
        for item in items
    ]


def _parts(parts: list[dict]) -> list[dict]:
    return [
        {k: list(v) if k == "logprobs" else copy.deepcopy(v) for k, v in part.items()}
        for part in parts
    ]


def usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class ResponseEvents:
    def __init__(self, response: dict) -> None:
        self.response = response
        self.sequence_number = 0
        self._message: dict | None = None  # the output message being written, if any

    @property
    def output(self) -> list[dict]:
        return self.response["output"]

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def _snapshot(self, kind: str) -> Event:
        return self._event(kind, response=snapshot(self.response))

    def start(self) -> list[Event]:
        """The first events: the response created, then `queued` or `in_progress` as its
        status is."""
        status = self.response["status"]
        return [self._snapshot("response.created"), self._snapshot(f"response.{status}")]

    def leave_queue(self) -> list[Event]:
        """A queued response starts: it is `in_progress`."""
        self.response["status"] = "in_progress"
        return [self._snapshot("response.in_progress")]

    def text(self, delta: str, logprobs: list[dict] | None = None) -> list[Event]:
        """Model text: opens the output message on first use, then one delta event, with
        the logprobs of the tokens that wrote it (content part shape) when asked for."""
        events = []
        if self._message is None:
            self._message = {
                "id": new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            self.output.append(self._message)
            index = len(self.output) - 1
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item=copy.deepcopy(self._message),
                )
            )
            self._message["content"].append(output_text_part(""))
            events.append(
                self._event(
                    "response.content_part.added",
                    output_index=index,
                    item_id=self._message["id"],
                    content_index=0,
                    part=output_text_part(""),
                )
            )
        part = self._message["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs or []
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=len(self.output) - 1,
                content_index=0,
                delta=delta,
                logprobs=event_logprobs(logprobs or []),
            )
        )
        return events

    def numbered(self, event: dict) -> Event:
        """An event made elsewhere (the agent's tool events), numbered in this stream."""
        fields = dict(event)
        return self._event(fields.pop("type"), **fields)

    def close_message(self, annotate: Callable[[str], list[dict]] | None = None) -> list[Event]:
        """End the message being written, if any (a model turn is over); `annotate` gives
        its text's annotations (file citations), each announced by an event."""
        return self._close_message("completed", annotate)

    def _close_message(
        self, status: str, annotate: Callable[[str], list[dict]] | None = None
    ) -> list[Event]:
        message, self._message = self._message, None
        if message is None:
            return []
        index = self.output.index(message)
        part = message["content"][0]
        text = part["text"]
        message["status"] = status
        ids = {"item_id": message["id"], "output_index": index}
        part["annotations"] = annotate(text) if annotate is not None else []
        events = [
            self._event(
                "response.output_text.annotation.added",
                **ids,
                content_index=0,
                annotation_index=i,
                annotation=copy.deepcopy(annotation),
            )
            for i, annotation in enumerate(part["annotations"])
        ]
        return [
            *events,
            self._event(
                "response.output_text.done",
                **ids,
                content_index=0,
                text=text,
                logprobs=event_logprobs(part["logprobs"]),
            ),
            self._event(
                "response.content_part.done",
                **ids,
                content_index=0,
                part=output_text_part(text, part["annotations"], part["logprobs"]),
            ),
            self._event(
                "response.output_item.done", output_index=index, item=copy.deepcopy(message)
            ),
        ]

    def function_call(self, call: ParsedCall) -> list[Event]:
        """A tool call from the parser: an output item of its own, `incomplete` when the
        token budget ran out inside its arguments (or before them, a forced call cut
        before its name: no arguments, so no delta event)."""
        events = self._close_message("completed")
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": new_id("call"),
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        self.output.append(item)
        index = len(self.output) - 1
        events.append(
            self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))
        )
        item["arguments"] = call.arguments
        item["status"] = "completed" if call.complete else "incomplete"
        if call.arguments:
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=call.arguments,
                )
            )
        events += [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            ),
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item)),
        ]
        return events

    def error(self, message: str) -> Event:
        """A failure outside the model's output (the store, say), as an `error` event."""
        return self._event("error", code="server_error", message=message, param=None)

    def finish(
        self,
        status: str,
        totals: dict | None,
        completed_at: int,
        incomplete_reason: str | None = None,
        error: dict | None = None,
        annotate: Callable[[str], list[dict]] | None = None,
    ) -> list[Event]:
        """Close what is open and end the response with `status`. A message still being
        written (cut by max_output_tokens, say) gets the annotations of the text it has,
        by `annotate`, as OpenAI's incomplete messages do. A completed response
        with no output at all still gets its (empty) message, as OpenAI's do. An
        incomplete one without a reason (the client went away) has no
        `incomplete_details`: the Open Responses spec requires their `reason` to be a
        string, and none of the OpenAI SDK's reasons applies."""
        events = []
        if status == "completed" and not self.output:
            events += self.text("")
        events += self._close_message(
            "completed" if status == "completed" else "incomplete", annotate
        )
        self.response.update(
            status=status,
            usage=totals,
            error=error,
            incomplete_details=(
                {"reason": incomplete_reason}
                if status == "incomplete" and incomplete_reason is not None
                else None
            ),
            completed_at=completed_at if status == "completed" else None,
        )
        events.append(self._snapshot(_FINAL_EVENTS[status]))
        return events
