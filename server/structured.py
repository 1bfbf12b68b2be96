"""The chat and completions APIs' output structures (`response_format`, tool calls) as the
engine's `StructuredOutputsParams`; the grammars are orchestrator/output_structure.py's,
shared with the Responses API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine.structured_output import StructuredOutputsParams
from orchestrator import InvalidRequestError
from orchestrator.chat_types import ChatRequest, ResponseFormat, Tool
from orchestrator.output_structure import (
    ANY_OBJECT,
    json_format_params,
    require_json_mention,
    turn_structure,
)
from server.errors import invalid


@contextmanager
def _as_api_error() -> Iterator[None]:
    """The product's 400 as the chat routes' `APIError` (same message and param)."""
    try:
        yield
    except InvalidRequestError as exc:
        raise invalid(exc.message, exc.param) from None


def _format_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None:
        return None
    return ANY_OBJECT if fmt.type == "json_object" else fmt.schema or {}


def response_format_params(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    schema = _format_schema(fmt)
    with _as_api_error():
        return None if schema is None else json_format_params(schema, "response_format")


def chat_structured_outputs(
    request: ChatRequest, tools: list[Tool]
) -> StructuredOutputsParams | None:
    """What a chat completion's output is constrained to (None: free text)."""
    functions = [(t.name, t.spec["function"].get("parameters")) for t in tools]
    with _as_api_error():
        structure = turn_structure(
            functions,
            request.tool_choice,
            request.parallel_tool_calls,
            _format_schema(request.response_format),
            "response_format",
        )
        if request.response_format and request.response_format.type == "json_object":
            texts = (m.content for m in request.messages)
            require_json_mention(texts, "messages", "response_format")
    return structure
