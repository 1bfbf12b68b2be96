"""The structure a turn's output must have, as the engine's `StructuredOutputsParams`:
a JSON format (any object, or one matching a schema) and tool calls.

Shared by the chat API (server/structured.py) and the Responses API
(orchestrator/turn_prompt.py), so both give the same guarantee. Tool calls are written in
the format orchestrator/tool_parser.py reads:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with `arguments` constrained by the function's JSON schema. A forced choice makes the whole
output calls: a named function exactly one, "required" one, or with parallel calls one or
more separated by newlines. "auto" leaves the model free to write text, but the opening
tag triggers the grammar lazily (llguidance's lazy lexemes): from `<tool_call>` on, the
call must complete validly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from engine.structured_output import StructuredOutputsParams, json_schema_grammar_fragment
from orchestrator.errors import InvalidRequestError
from orchestrator.tool_parser import CALL_PREFIX, CLOSE_TAG, OPEN_TAG
from orchestrator.untrusted import FRAME_NOTE_OPEN

# A function declared without parameters takes none: `{}` is its only arguments.
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# Calls one forced turn may make with parallel calls on: a small model, once forced to
# call, tends to repeat the call until its budget runs out and cuts the last one.
MAX_PARALLEL_CALLS = 8
ANY_OBJECT = {"type": "object"}
# What only the server writes, around real calls, their results and untrusted text: how
# the protocol's tags begin (`<tool_call>`, `</tool_response>`, the frame's `<untrusted
# ...>`: any tag so begun, since a small model refused the tags themselves writes
# `<tool_response]` or `<untrust>`), and the frame's note. A model writing one in its text
# shows the protocol to the user, and forges it: a call, a result or a frame the server
# never made, in the next turn's prompt. Case counts, as it does for the server: its
# parser reads calls by their exact tags (orchestrator/tool_parser.py; so do templates'
# tool tokens, such as Qwen's `<tool_call>`), nothing parses the frame, and the model
# echoes markup in the case the prompt shows it; `<TOOL_CALL>` or a bare `</tool>` is
# text to the server, neither a call nor a result. (Untrusted text's tags are broken up
# in any case, orchestrator/untrusted.py: whoever writes that data chooses them.)
RESERVED = ("<tool_", "</tool_", "<untrust", "</untrust", FRAME_NOTE_OPEN)
_ANY = "(.|\\n)*"
_RESERVED = "|".join(re.escape(t).replace("/", "\\/") for t in RESERVED)
# Lark token bodies (llguidance's `&`: both sides match; `~`: the other does not).
_NOTHING_RESERVED = f"~/{_ANY}({_RESERVED}){_ANY}/"
# Text holding nothing RESERVED.
_FREE_TEXT = f"/{_ANY}/ & {_NOTHING_RESERVED}"
# The same, its first character past any whitespace not `<`: text right after tool
# results, which a small model otherwise opens with the markup it has just read. Before
# a call there, `_LEAD`: some text comes first (refused `<tool_response>`, the default
# 135M model calls the function again instead of answering).
_PLAIN_TEXT = f"/\\s*([^<\\s]{_ANY})?/ & {_NOTHING_RESERVED}"
_LEAD = f"/\\s*[^<\\s]{_ANY}/ & {_NOTHING_RESERVED}"


def _lark(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


# How the engine's messages name a JSON schema: by vLLM's field, which a client of
# response_format, text.format or a function's parameters never sent.
_ENGINE_SCHEMA = "structured_outputs.json"


def checked(param: str, what: str | None = None, **kind) -> StructuredOutputsParams:
    """StructuredOutputsParams, with an invalid schema or grammar a 400 naming `param`,
    its message about `what` (default: `param`; not repeated where the engine's message
    starts with it, as it does for vLLM's own `structured_outputs.<kind>` field, and the
    schema the engine calls by that field called "the schema" for any other)."""
    try:
        return StructuredOutputsParams(**kind)
    except ValueError as exc:
        what = what or param
        message = str(exc)
        if not message.startswith(what):
            message = f"{what}: {message.replace(_ENGINE_SCHEMA, 'the schema', 1)}"
        raise InvalidRequestError(message, param) from None


@dataclass(frozen=True)
class Strict:
    """A schema its client declared `"strict": true`, held to OpenAI's strict rules
    (`_check_strict`); `label` and `code` are what OpenAI's 400 calls it."""

    label: str  # "function 'get_weather'", "response_format 'answer'"
    code: str

    @classmethod
    def function(cls, name: str) -> Strict:
        return cls(f"function {name!r}", "invalid_function_parameters")

    @classmethod
    def response_format(cls, name: str) -> Strict:
        return cls(f"response_format {name!r}", "invalid_json_schema")


def json_format_params(
    schema: dict, param: str, what: str | None = None, strict: Strict | None = None
) -> StructuredOutputsParams:
    """JSON matching `schema` (ANY_OBJECT: any JSON object, the engine's json_object); an
    error is a 400 naming `param`, its message about `what` (default: `param`), or the
    one OpenAI gives for a `strict` schema outside its strict rules."""
    what = what or param
    schema = _rooted(schema)
    _require_object(schema, param, what)
    if strict is not None:
        _check_strict(schema, param, strict)
    if schema == ANY_OBJECT:
        return checked(param, what, json_object=True)
    return checked(param, what, json=schema)


_TYPED = "schema must have a 'type' key."
# Keywords OpenAI's strict mode refuses (its structured-outputs guide lists what it
# supports: anyOf, not the rest of JSON Schema's composition, conditionals or object
# and array keywords beyond properties, required, additionalProperties, items, minItems
# and maxItems); OpenAI's 400 names the first in the subschema. The grammar engine
# would enforce some of them (allOf, patternProperties) and refuse others (not, if).
_NOT_PERMITTED = frozenset(
    {
        "allOf", "oneOf", "not", "if", "then", "else",
        "dependentRequired", "dependentSchemas", "dependencies",
        "patternProperties", "propertyNames", "unevaluatedProperties", "minProperties",
        "maxProperties", "prefixItems", "unevaluatedItems", "contains", "minContains",
        "maxContains", "uniqueItems",
    }
)  # fmt: skip
_CLOSED = "'additionalProperties' is required to be supplied and to be false."
_ALL_REQUIRED = (
    "'required' is required to be supplied and to be an array including every key in properties."
)


def _check_strict(schema: dict, param: str, strict: Strict) -> None:
    """OpenAI's rules for a strict schema, as its 400 gives them: every subschema (a
    property's, an array's items, a branch of anyOf, a definition) is a JSON object (not
    a boolean schema: `true` would let anything through, `false` nothing), uses none of
    the keywords strict mode does not support (`_NOT_PERMITTED`), and names its `type`,
    unless it is an `anyOf`, a `$ref` or an `enum` (OpenAI's guide lists enums among its
    supported types; a `const` alone does not do: OpenAI refuses `{"const": "x"}`), so a
    schema a client's strict schemas pass on OpenAI's API is never refused here for want of
    a type; every object (the root too) is closed with
    `additionalProperties: false`, with `properties`, each of them in `required` (an
    optional one is required and nullable). The grammar would enforce many schemas
    outside these rules; a client that declared it strict is told where it would not
    pass on OpenAI's API."""
    for path, node in _subschemas(schema):
        rule = _strict_rule(node)
        if rule is not None:
            raise InvalidRequestError(
                f"Invalid schema for {strict.label}: In context={path!r}, {rule}",
                param,
                strict.code,
            )


def _subschemas(schema: dict) -> Iterable[tuple[tuple[str, ...], object]]:
    """The subschemas of a (rooted) schema in document order, each with its path: the
    places OpenAI's strict mode looks for them, `$ref`s not followed (their targets are
    definitions, visited as such). What stands in a subschema's place is yielded as it
    is (a boolean schema too); the subschemas of keywords strict mode refuses are not
    visited, as the keyword's node is refused first."""
    stack: list[tuple[tuple[str, ...], object]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if not isinstance(node, dict):
            continue
        children = [
            ((*path, key, name), sub)
            for key in ("properties", "$defs", "definitions")
            if isinstance(node.get(key), dict)
            for name, sub in node[key].items()
        ]
        if "items" in node:
            children.append(((*path, "items"), node["items"]))
        if isinstance(node.get("anyOf"), list):
            children += [((*path, "anyOf", str(i)), sub) for i, sub in enumerate(node["anyOf"])]
        stack.extend(reversed(children))


def _is_object(node: dict) -> bool:
    kind = node.get("type")
    if kind is None:
        return isinstance(node.get("properties"), dict)
    return "object" in (kind if isinstance(kind, list) else [kind])


def _strict_rule(node: object) -> str | None:
    """The strict rule a subschema breaks, as OpenAI words it, or None."""
    if not isinstance(node, dict):
        return f"schema must be a JSON object, got {json.dumps(node)[:40]}."
    refused = next((key for key in node if key in _NOT_PERMITTED), None)
    if refused is not None:
        return f"{refused!r} is not permitted."
    if "type" not in node and not {"anyOf", "$ref", "enum"} & node.keys():
        return _TYPED
    if not _is_object(node):
        return None
    if node.get("additionalProperties") is not False:
        return _CLOSED
    properties = node.get("properties")
    if not isinstance(properties, dict):
        return "object schema missing properties."
    required = node.get("required")
    required = required if isinstance(required, list) else []
    missing = [name for name in properties if name not in required]
    if missing:
        return f"{_ALL_REQUIRED} Missing {missing[0]!r}."
    extra = [name for name in required if name not in properties]
    if extra:
        return f"{_ALL_REQUIRED} Extra required key {extra[0]!r} supplied."
    return None


def require_json_mention(texts: Iterable[str | None], param: str, fmt_param: str) -> None:
    """OpenAI's rule for the json_object format: the messages must ask for JSON by name
    (any case). The format fixes only the syntax, so a model never told what JSON to write
    tends to fill its budget with whitespace or an empty object."""
    if not any(isinstance(text, str) and "json" in text.lower() for text in texts):
        raise InvalidRequestError(
            f"'{param}' must contain the word 'json' in some form, to use '{fmt_param}' "
            "of type 'json_object'.",
            param,
        )


def _rooted(schema: dict) -> dict:
    """A schema whose root names no type (`{}`, or properties alone) as an object's: a
    grammar would otherwise allow any JSON value there, such as an endless string."""
    return schema if "type" in schema else {**schema, "type": "object"}


def _require_object(schema: dict, param: str, what: str) -> None:
    """OpenAI's rule: a structured output, like a function's arguments, is a JSON object."""
    kind = schema["type"]
    if "object" not in (kind if isinstance(kind, list) else [kind]):
        raise InvalidRequestError(
            f'{what} must be a JSON schema of "type": "object", got "type": {json.dumps(kind)}',
            param,
        )


def check_left_out(
    declared: list[tuple[str, dict | None]],
    offered: Collection[str],
    params: dict[str, str],
    tools_param: str,
    strict: Collection[str] = (),
) -> None:
    """The declared functions (name, parameters schema) a generation's grammar leaves out
    ("none", another function named), checked as the offered ones are: as in OpenAI's API,
    a bad schema is a 400 whatever the tool choice. `strict`: the functions declared
    strict."""
    left_out = [(name, schema) for name, schema in declared if name not in offered]
    _check_functions(left_out, params, tools_param, strict)


def _check_functions(
    functions: list[tuple[str, dict | None]],
    params: dict[str, str],
    tools_param: str,
    strict: Collection[str],
) -> None:
    """Each function's parameters checked alone, so that an error names the function and
    its schema's place in the request (`params`: name to path, else `tools_param`): the
    tool grammar's own error would quote the grammar we compiled them into. Those of
    the functions in `strict` (declared strict) are held to OpenAI's strict rules too."""
    for name, schema in functions:
        param = params.get(name, tools_param)
        what = f"{param}: function {name!r} parameters"
        if name in strict:  # as given: `{}` is an object left open there
            given = _NO_ARGUMENTS if schema is None else schema
            json_format_params(given, param, what, Strict.function(name))
        else:
            json_format_params(schema or _NO_ARGUMENTS, param, what)


def _text_token(after_results: bool) -> str:
    return _PLAIN_TEXT if after_results else _FREE_TEXT


def protocol_text(after_results: bool) -> StructuredOutputsParams:
    """Text holding nothing `RESERVED`: the output of a turn offered no tools whose prompt
    shows calls or their results, which a small model otherwise copies. `after_results`:
    the prompt ends with results (an answer), and the text cannot open with `<` either;
    the default 135M model otherwise goes on with the markup it has just read, writing
    `<tool_response]` or `<untrust>` where the tags themselves are refused."""
    rules = ["start: TEXT", f"TEXT: {_text_token(after_results)}"]
    return StructuredOutputsParams(grammar=_grammar(rules))


def _call_rules(functions: list[tuple[str, dict | None]], rule: str, opening: str) -> list[str]:
    """Lark rules: `rule` is `opening` then the rest of a block calling one of `functions`
    (name, parameters schema)."""
    names = [f"fn_{i}" for i in range(len(functions))]
    closing = "}\n" + CLOSE_TAG  # the wrapping object's brace, then the tag on its own line
    rules = [f"{rule}: {_lark(opening)} ({' | '.join(names)}) {_lark(closing)}"]
    for rule_name, (name, schema) in zip(names, functions, strict=True):
        rules.append(f"{rule_name}: {_lark(CALL_PREFIX.format(name=name))} {rule_name}_args")
        arguments = _rooted(schema) if schema else _NO_ARGUMENTS
        rules.append(f"{rule_name}_args: {json_schema_grammar_fragment(arguments)}")
    return rules


def tool_call_grammar(
    functions: list[tuple[str, dict | None]],
    forced: bool,
    parallel: bool,
    answer_schema: dict | None = None,
    after_results: bool = False,
) -> str:
    """The Lark grammar for a turn with `functions` (name, parameters schema) offered.

    forced: only calls (one, or 1 to MAX_PARALLEL_CALLS if `parallel`). Otherwise text with lazily
    triggered calls; with `answer_schema` (a JSON format), the text is that JSON instead
    (chosen by its first character), so an answer is either the JSON or calls. The text
    holds nothing `RESERVED` (but the opening tag that starts a call); `after_results`
    (the prompt ends with tool results) it does not open with `<` either (`protocol_text`).
    """
    calls = f'call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
    if forced:
        start = [f"start: {calls}"]
    elif answer_schema is not None:
        start = [
            f"start: answer | {calls}",
            f"answer: {json_schema_grammar_fragment(_rooted(answer_schema))}",
        ]
    else:
        # The opening tag ends free text lazily: at its first occurrence the call begins,
        # and the rest of the block (`call_body`) follows it. Without parallel calls the
        # turn ends after one.
        start = [
            "start: (lazy_call)* TEXT" if parallel else "start: TEXT | lazy_call",
            f"TEXT: {_text_token(after_results)}",
            f"LEAD: {_LEAD if after_results else _FREE_TEXT}",
            f"call_trigger[lazy]: LEAD {_lark(OPEN_TAG)}",
            "lazy_call: call_trigger call_body",
        ]
        return _grammar(start, _call_rules(functions, "call_body", "\n"))
    return _grammar(start, _call_rules(functions, "call", OPEN_TAG + "\n"))


def _grammar(start: list[str], rules: Iterable[str] = ()) -> str:
    return "\n".join(["%llguidance {}", *start, *rules]) + "\n"


def turn_structure(
    functions: list[tuple[str, dict | None]],
    choice: str,
    parallel: bool,
    fmt_schema: dict | None,
    fmt_param: str,
    schema_param: str | None = None,
    function_params: dict[str, str] | None = None,
    tools_param: str = "tools",
    strict_functions: Collection[str] = (),
    strict_format: str | None = None,
    shows_calls: bool = False,
    after_results: bool = False,
) -> StructuredOutputsParams | None:
    """What a turn's output is constrained to (None: free text).

    choice: the tool choice, "auto", "required" or "function" (one named function). The
    last two force a call; a named function is called once, even with `parallel` calls
    (a small model would otherwise repeat the same call until the budget runs out).

    fmt_schema: the JSON format's schema (ANY_OBJECT for any object), None for text. A bad
    schema is a 400 naming `schema_param` (default `fmt_param`), checked on its own first
    so that the error names the schema even when tools are offered too. A forced turn
    writes calls only, so the format, as in OpenAI's API, shapes the turns that answer in
    text (a Responses turn's answer after its tools ran); clients such as instructor's
    RESPONSES_TOOLS mode and the Agents SDK's output_type send both.

    function_params: where each function's parameters schema is in the request (name to
    path, as `tools[0].function.parameters`), the param a bad one's 400 names; a function
    not in it (a built-in's, whose schema the server fills in) is named by `tools_param`.

    strict_functions, strict_format: the functions, and the format's name, that the
    client declared `"strict": true`, whose schemas OpenAI's strict rules hold
    (`_check_strict`).

    shows_calls: the prompt holds tool calls or results. Text written with tools offered
    never holds anything `RESERVED`; nor, with this, text written without.
    after_results: the prompt ends with tool results; text cannot open with `<`
    (`protocol_text`).
    """
    answer = None
    if fmt_schema is not None:
        strict = None if strict_format is None else Strict.response_format(strict_format)
        answer = json_format_params(fmt_schema, schema_param or fmt_param, strict=strict)
    if not functions:
        text = answer is None and (shows_calls or after_results)
        return protocol_text(after_results) if text else answer
    forced = choice in ("required", "function")
    _check_functions(functions, function_params or {}, tools_param, strict_functions)
    parallel = parallel and choice != "function"
    grammar = tool_call_grammar(functions, forced, parallel, fmt_schema, after_results)
    return checked(tools_param, grammar=grammar)
