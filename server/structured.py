"""The chat and completions APIs' output structures (`response_format`, vLLM's
`structured_outputs` and `guided_*` fields, tool calls) as the engine's
`StructuredOutputsParams`; the grammars are orchestrator/output_structure.py's, shared
with the Responses API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine.structured_output import StructuredOutputsParams
from orchestrator import InvalidRequestError
from orchestrator.chat_types import ChatRequest, CompletionRequest, Guided, ResponseFormat, Tool
from orchestrator.output_structure import (
    ANY_OBJECT,
    Strict,
    check_left_out,
    checked,
    json_format_params,
    require_json_mention,
    turn_structure,
)
from server.errors import invalid


@contextmanager
def _as_api_error() -> Iterator[None]:
    """The product's 400 as the chat routes' `APIError` (same message, param and code)."""
    try:
        yield
    except InvalidRequestError as exc:
        raise invalid(exc.message, exc.param, exc.code) from None


def _format_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None:
        return None
    return ANY_OBJECT if fmt.type == "json_object" else fmt.schema or {}


def _strict_format(fmt: ResponseFormat | None) -> str | None:
    """The name of a json_schema format declared strict (`output_structure.Strict`)."""
    return fmt.name if fmt is not None and fmt.strict else None


def _guided_params(guided: Guided) -> StructuredOutputsParams:
    """vLLM's structure as the engine's; a json schema under response_format's checks (a
    schema of an object, its root typed as one when it names no type)."""
    what = guided.param if guided.param.startswith("guided_") else f"{guided.param}.{guided.kind}"
    with _as_api_error():
        if guided.kind == "json":
            return json_format_params(guided.value, guided.param, what)
        return checked(guided.param, what, **{guided.kind: guided.value})


def completion_structured_outputs(request: CompletionRequest) -> StructuredOutputsParams | None:
    """What a legacy completion's output is constrained to (None: free text)."""
    if request.guided is not None:
        return _guided_params(request.guided)
    fmt = request.response_format
    schema = _format_schema(fmt)
    name = _strict_format(fmt)
    strict = None if name is None else Strict.response_format(name)
    with _as_api_error():
        return (
            None if schema is None else json_format_params(schema, "response_format", None, strict)
        )


def chat_structured_outputs(
    request: ChatRequest, tools: list[Tool], native_tools: bool = False
) -> StructuredOutputsParams | None:
    """What a chat completion's output is constrained to (None: free text). vLLM's
    structure fields come without tools and response_format (server/protocol.py).
    `native_tools`: the model's template has a tool section of its own (chat_prompt), so
    the rules for an answer right after results, measured on models that only read our
    default tool prompt, do not apply to it."""
    if request.guided is not None:
        return _guided_params(request.guided)
    functions = [(t.name, t.spec["function"].get("parameters")) for t in tools]
    params = {t.name: f"tools[{i}].function.parameters" for i, t in enumerate(request.tools)}
    declared = [(t.name, t.spec["function"].get("parameters")) for t in request.tools]
    strict = {t.name for t in request.tools if t.spec["function"].get("strict") is True}
    with _as_api_error():
        check_left_out(declared, {t.name for t in tools}, params, "tools", strict)
        structure = turn_structure(
            functions,
            request.tool_choice,
            request.parallel_tool_calls,
            _format_schema(request.response_format),
            "response_format",
            function_params=params,
            strict_functions=strict,
            strict_format=_strict_format(request.response_format),
            shows_calls=any(m.role == "tool" or m.tool_calls for m in request.messages),
            after_results=request.messages[-1].role == "tool" and not native_tools,
        )
        if request.response_format and request.response_format.type == "json_object":
            texts = (m.content for m in request.messages)
            require_json_mention(texts, "messages", "response_format")
    return structure
