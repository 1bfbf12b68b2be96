"""The structure a request's output must have: `response_format` and tool calls, as the
engine's `StructuredOutputsParams`.

Tool calls are written in the format server/tool_parser.py reads:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with `arguments` constrained by the function's JSON schema. `tool_choice` "required" (or a
named function) makes the whole output one call, or with `parallel_tool_calls` one or more
calls separated by newlines. "auto" leaves the model free to write text, but the opening tag
triggers the grammar lazily (llguidance's lazy lexemes): from `<tool_call>` on, the call
must complete validly.
"""

from __future__ import annotations

import json

from engine.structured_output import StructuredOutputsParams, json_schema_grammar_fragment
from server.errors import invalid
from server.protocol import ChatRequest, ResponseFormat, Tool
from server.tool_parser import CALL_PREFIX, CLOSE_TAG, OPEN_TAG

_NO_ARGUMENTS = {"type": "object", "properties": {}}


def _lark(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _format_schema(fmt: ResponseFormat) -> dict:
    return {"type": "object"} if fmt.type == "json_object" else fmt.schema or {}


def _checked(param: str, **kind) -> StructuredOutputsParams:
    """StructuredOutputsParams, with an invalid schema or grammar a 400 naming `param`."""
    try:
        return StructuredOutputsParams(**kind)
    except ValueError as exc:
        raise invalid(f"{param}: {exc}", param) from None


def response_format_params(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None:
        return None
    if fmt.type == "json_object":
        return _checked("response_format", json_object=True)
    return _checked("response_format", json=_format_schema(fmt))


def _call_rules(tools: list[Tool], rule: str, opening: str) -> list[str]:
    """Lark rules: `rule` is `opening` then the rest of a block calling one of `tools`."""
    names = [f"fn_{i}" for i in range(len(tools))]
    closing = "}\n" + CLOSE_TAG  # the wrapping object's brace, then the tag on its own line
    rules = [f"{rule}: {_lark(opening)} ({' | '.join(names)}) {_lark(closing)}"]
    for name, tool in zip(names, tools, strict=True):
        schema = tool.spec["function"].get("parameters") or _NO_ARGUMENTS
        rules.append(f"{name}: {_lark(CALL_PREFIX.format(name=tool.name))} {name}_args")
        rules.append(f"{name}_args: {json_schema_grammar_fragment(schema)}")
    return rules


def tool_call_grammar(tools: list[Tool], forced: bool, parallel: bool,
                      fmt: ResponseFormat | None = None) -> str:
    """The Lark grammar for a chat turn with `tools` offered.

    forced: only calls (one, or one or more if `parallel`). Otherwise text with lazily
    triggered calls; with a response_format, the text is that JSON instead (chosen by its
    first character), so an answer is either the JSON or calls.
    """
    calls = 'call ("\\n" call)*' if parallel else "call"
    if forced:
        start = [f"start: {calls}"]
    elif fmt is not None:
        start = [f"start: answer | {calls}",
                 f"answer: {json_schema_grammar_fragment(_format_schema(fmt))}"]
    else:
        # The opening tag ends free text lazily: at its first occurrence the call begins,
        # and the rest of the block (`call_body`) follows it. Without parallel calls the
        # turn ends after one.
        start = ["start: (lazy_call)* TEXT" if parallel else "start: TEXT | lazy_call",
                 "TEXT: /(.|\\n)*/",
                 f"call_trigger[lazy]: TEXT {_lark(OPEN_TAG)}",
                 "lazy_call: call_trigger call_body"]
        return _grammar(start, _call_rules(tools, "call_body", "\n"))
    return _grammar(start, _call_rules(tools, "call", OPEN_TAG + "\n"))


def _grammar(start: list[str], rules: list[str]) -> str:
    return "\n".join(["%llguidance {}", *start, *rules]) + "\n"


def chat_structured_outputs(request: ChatRequest,
                            tools: list[Tool]) -> StructuredOutputsParams | None:
    """What a chat completion's output is constrained to (None: free text)."""
    fmt = request.response_format
    if not tools:
        return response_format_params(fmt)
    forced = request.tool_choice in ("required", "function")
    if forced and fmt is not None:
        raise invalid("response_format cannot be combined with a tool_choice that forces a "
                      "call", "response_format")
    grammar = tool_call_grammar(tools, forced, request.parallel_tool_calls, fmt)
    return _checked("tools", grammar=grammar)
