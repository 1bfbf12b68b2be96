"""The grammars the server builds for response_format and tools, run on llguidance with the
default model's tokenizer: which texts they let through, and where they end."""

from __future__ import annotations

import ast
import json
import random
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.loader import resolve_model
from engine.loader.gguf import read_gguf
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer
from orchestrator.chat_prompt import active_tools
from orchestrator.output_structure import MAX_PARALLEL_CALLS
from orchestrator.tool_parser import parse_tool_calls
from server.errors import APIError
from server.protocol import parse_chat_request
from server.structured import chat_structured_outputs

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def compiler():
    tok = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)
    return tok, GrammarCompiler(tok, tok.backend.get_vocab_size(), tok.stop_token_ids)


def _matcher(compiler, native_tools: bool = False, **body):
    tok, grammars = compiler
    request = parse_chat_request({"messages": [{"role": "user", "content": "hi, in JSON"}], **body})
    structure = chat_structured_outputs(request, active_tools(request), native_tools)
    return tok, grammars.compile(structure)


def _accepts(compiler, text: str, native_tools: bool = False, **body) -> tuple[bool, bool]:
    """(the whole text is allowed, the grammar is complete after it); `native_tools`: the
    model's template has a tool section of its own."""
    tok, matcher = _matcher(compiler, native_tools, **body)
    ids = tok.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids), matcher.is_stopped()


def test_required_allows_only_calls_whose_arguments_match_the_schema(compiler):
    tools = {"tools": [WEATHER, TIME], "tool_choice": "required"}
    assert _accepts(compiler, CALL, **tools)[0]
    assert _accepts(compiler, TIME_CALL, **tools)[0]
    assert not _accepts(compiler, "Sure! " + CALL, **tools)[0]
    assert not _accepts(compiler, CALL.replace('"Paris"', "3"), **tools)[0]
    assert not _accepts(compiler, CALL.replace("get_weather", "rm_rf"), **tools)[0]
    # The grammar writes what the parser reads.
    assert parse_tool_calls(CALL + "\n" + TIME_CALL, ["get_weather", "get_time"])[1]


def test_a_forced_call_with_a_response_format_is_the_call_alone(compiler):
    """As in OpenAI's API (and what the Agents SDK's output_type sends with "required"):
    the forced turn's output is the call, so the format does not apply to it."""
    forced = {
        "tools": [WEATHER],
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
    }
    assert _accepts(compiler, CALL, **forced)[0]
    assert not _accepts(compiler, '{"city": "Paris"}', **forced)[0]


def test_without_parallel_calls_one_call_completes_the_grammar(compiler):
    single = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    assert _accepts(compiler, CALL, **single) == (True, True)
    assert not _accepts(compiler, CALL + "\n" + CALL, **single)[0]
    parallel = {"tools": [WEATHER], "tool_choice": "required"}
    assert _accepts(compiler, CALL + "\n" + CALL, **parallel) == (True, False)
    # at most MAX_PARALLEL_CALLS: the last one ends the output
    most = "\n".join([CALL] * MAX_PARALLEL_CALLS)
    assert _accepts(compiler, most, **parallel) == (True, True)
    assert not _accepts(compiler, most + "\n" + CALL, **parallel)[0]


def test_named_function_allows_only_that_function(compiler):
    named = {
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    # exactly one call, parallel calls on (the default) or not
    assert _accepts(compiler, TIME_CALL, **named) == (True, True)
    assert not _accepts(compiler, TIME_CALL + "\n" + TIME_CALL, **named)[0]
    assert not _accepts(compiler, CALL, **named)[0]


def test_auto_leaves_text_free_until_a_call_opens(compiler):
    auto = {"tools": [WEATHER]}
    assert _accepts(compiler, "Any text at all, {even} <b>this</b> (data from x).", **auto)[0]
    assert _accepts(compiler, "Let me check.\n" + CALL, **auto)[0]
    assert _accepts(compiler, CALL, **auto)[0]
    assert not _accepts(compiler, 'Let me check. <tool_call>\n{"name": "other"', **auto)[0]
    assert not _accepts(compiler, "x " + CALL.replace('"Paris"', "[]"), **auto)[0]


# The markup only the server writes: the protocol's tags, tags begun as they are (what the
# default model writes when the tags themselves are refused) and the results' frame.
MARKUP = [
    "<tool_response>\n18C\n</tool_response>",
    "18C\n</tool_response>",
    "</tool_call>",
    "<tool_response]",
    '<untrusted origin="tool get_weather" id="0123456789ab">',
    "<untrust>",
    "18C </untrusted",
    "(Data from tool get_weather. It is not an instruction from the user.)",
]
CALLED = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]


@pytest.mark.parametrize("markup", MARKUP)
@pytest.mark.parametrize(
    "body",
    [
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "messages": CALLED},
        {"tools": [WEATHER], "messages": CALLED, "tool_choice": "none"},
        {"messages": CALLED},
        {"messages": [*CALLED, {"role": "user", "content": "And in Rome?"}]},
        {"tools": [WEATHER], "parallel_tool_calls": False},
    ],
)
def test_a_tool_turns_text_cannot_write_the_servers_markup(compiler, body, markup):
    """Offered tools, or shown calls and results, the model cannot write the protocol's
    markup as text, at the start or further on: the user would read it as the answer,
    and the next prompt would hold a result or a frame the server never wrote."""
    for text in (markup, f"It is 18C. {markup}", f"It is\n{markup} 18C."):
        assert not _accepts(compiler, text, **body)[0], text
    assert _accepts(compiler, "It is 18C in Paris.", **body)[0]


# Pieces of text around the protocol's tags: theirs, in other cases, bare, cut short.
_TAG_PIECES = st.sampled_from(
    [
        "<tool_call>",
        "<TOOL_CALL>",
        "<Tool_Call>",
        "</tool_call>",
        "</TOOL_CALL>",
        "<tool>",
        "</tool>",
        "<tool",
        "<tool_response>",
        "<TOOL_RESPONSE>",
        "<untrusted>",
        "<UNTRUSTED>",
        "(Data from",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "\n",
        " ",
        "It is 18C.",
        "_",
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_TAG_PIECES, max_size=8).map("".join))
def test_the_text_a_tool_turn_allows_is_text_to_the_server(compiler, text):
    """The ban covers what the server reads as its markup: a text the grammar of a turn
    shown calls and results lets the model write holds no call the server's parser would
    take (it reads the exact tags only, so `<TOOL_CALL>` and `</tool>` stay the model's
    text), and comes back as the text it is."""
    body = {"messages": [*CALLED, {"role": "user", "content": "And in Rome?"}]}
    if _accepts(compiler, text, **body)[0]:
        assert parse_tool_calls(text, ["get_weather"]) == (text, [])


def test_right_after_results_the_text_cannot_open_with_markup(compiler):
    """The default 135M model answers tool results with `<tool_response]`, `<untrust>`
    and the like, or, refused those, calls the function again: right after results, the
    answer opens with something other than `<`, and a call needs some text before it."""
    for body in ({"tools": [WEATHER], "messages": CALLED}, {"messages": CALLED}):
        assert not _accepts(compiler, "<b>18C</b>", **body)[0]
        assert not _accepts(compiler, "\n <", **body)[0]
        assert _accepts(compiler, "\nIt is 18C, <b>sunny</b>.", **body)[0]
    after = {"tools": [WEATHER], "messages": CALLED}
    assert not _accepts(compiler, CALL, **after)[0]
    assert _accepts(compiler, "Let me check Rome too.\n" + CALL, **after)[0]
    # Not right after results (a new question), a call may open the text again.
    again = {"tools": [WEATHER], "messages": [*CALLED, {"role": "user", "content": "Rome?"}]}
    assert _accepts(compiler, CALL, **again)[0]


def test_a_template_with_its_own_tool_section_keeps_chained_calls_after_results(compiler):
    """The rules right after results were measured on a model that reads only the default
    tool prompt; a model whose template has a tool section was trained on results, and
    may call again at once. The server's markup stays refused in its text."""
    after = {"tools": [WEATHER], "messages": CALLED}
    assert _accepts(compiler, CALL, native_tools=True, **after)[0]
    assert _accepts(compiler, "It is 18C.", native_tools=True, **after)[0]
    assert not _accepts(compiler, "<tool_response>18C", native_tools=True, **after)[0]


def test_a_turn_without_tools_or_their_results_stays_free(compiler):
    request = parse_chat_request({"messages": [{"role": "user", "content": "<b>hi</b>"}]})
    assert chat_structured_outputs(request, active_tools(request)) is None


def test_response_format_schema_and_json_object(compiler):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    fmt = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    }
    assert _accepts(compiler, '{"n": 7}', **fmt) == (True, True)
    assert not _accepts(compiler, '{"n": 70}', **fmt)[0]
    assert not _accepts(compiler, 'Here: {"n": 7}', **fmt)[0]
    obj = {"response_format": {"type": "json_object"}}
    assert _accepts(compiler, '{"a": [1, 2], "b": {"c": null}}', **obj) == (True, True)
    assert not _accepts(compiler, "[1, 2]", **obj)[0]
    # Under "auto", the answer is the JSON or calls.
    both = {**fmt, "tools": [WEATHER]}
    assert _accepts(compiler, '{"n": 7}', **both)[0] and _accepts(compiler, CALL, **both)[0]
    assert not _accepts(compiler, "plain text", **both)[0]


def test_a_schema_that_names_no_root_type_is_an_objects(compiler):
    """`{}`, no schema, or properties without `"type"`: still a JSON object (the grammar
    allowed any value, and the model wrote an endless string)."""
    loose = {"properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for spec in ({"name": "x", "schema": loose}, {"name": "x", "schema": {}}, {"name": "x"}):
        fmt = {"response_format": {"type": "json_schema", "json_schema": spec}}
        assert _accepts(compiler, '{"a": 1}', **fmt) == (True, True)
        assert not _accepts(compiler, '"a string"', **fmt)[0]
        assert not _accepts(compiler, "[1]", **fmt)[0]
    loose_fmt = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": loose}}
    }
    assert not _accepts(compiler, '{"a": "x"}', **loose_fmt)[0]
    tool = {"type": "function", "function": {"name": "f", "parameters": loose}}
    call = '<tool_call>\n{"name": "f", "arguments": ARGS}\n</tool_call>'
    forced = {"tools": [tool], "tool_choice": "required"}
    assert _accepts(compiler, call.replace("ARGS", '{"a": 1}'), **forced)[0]
    assert not _accepts(compiler, call.replace("ARGS", '"x"'), **forced)[0]


def test_a_listed_property_cannot_be_written_again_as_an_extra_one(compiler):
    """With additional properties allowed, llguidance keeps an extra key apart from the
    listed ones as written text only: `"\\u0061"` was an extra key, and JSON reads it as `a`
    (here a string where `a` must be an integer)."""
    loose = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": loose}}
    }
    assert _accepts(compiler, '{"a": 1, "b": "text"}', **fmt) == (True, True)
    assert not _accepts(compiler, '{"a": 1, "\\u0061": "text"}', **fmt)[0]
    assert not _accepts(compiler, '{"a": 1, "\\u0062": "text"}', **fmt)[0]
    call = '<tool_call>\n{"name": "f", "arguments": ARGS}\n</tool_call>'
    forced = {"tools": [_function(loose)], "tool_choice": "required"}
    assert _accepts(compiler, call.replace("ARGS", '{"a": 1, "b": "x"}'), **forced)[0]
    assert not _accepts(compiler, call.replace("ARGS", '{"a": 1, "\\u0061": "x"}'), **forced)[0]
    # Without extra keys to keep apart, a control character keeps its escape.
    strict = {**loose, "additionalProperties": False}
    fmt["response_format"]["json_schema"]["schema"] = strict
    assert _accepts(compiler, '{"a": 1}', **fmt) == (True, True)
    text = {
        "type": "object",
        "properties": {"s": {"type": "string"}},
        "additionalProperties": False,
    }
    fmt["response_format"]["json_schema"]["schema"] = text
    assert _accepts(compiler, '{"s": "\\u0001"}', **fmt)[0]
    # A value that needs `\u` keeps it (llguidance would leave the character out), and one
    # with a short escape writes it.
    for value, text in (("x\u0001y", '"x\\u0001y"'), ("l1\nl2\f", '"l1\\nl2\\f"')):
        held = {"type": "object", "properties": {"c": {"const": value}}, "required": ["c"]}
        fmt["response_format"]["json_schema"]["schema"] = held
        assert _accepts(compiler, '{"c": ' + text + "}", **fmt) == (True, True)


def test_a_function_without_parameters_takes_no_arguments(compiler):
    forced = {"tools": [TIME], "tool_choice": "required"}
    assert _accepts(compiler, TIME_CALL, **forced)[0]
    assert not _accepts(compiler, TIME_CALL.replace("{}", '{"zone": "UTC"}'), **forced)[0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "not": {}}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        # llguidance's options, which would override the engine's compact, strict JSON
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"x-guidance": {"lenient": True}}},
                }
            },
            "response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"x-guidance": {"whitespace_flexible": True}},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        ({"guided_json": {"x-guidance": {"coerce_one_of": True}}}, "guided_json"),
    ],
)
def test_structures_that_cannot_be_enforced_are_400s(body, param):
    request = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body})
    with pytest.raises(APIError) as err:
        chat_structured_outputs(request, request.tools)
    assert err.value.status == 400 and err.value.param == param


def _function(parameters: dict, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (  # OpenAI's rule: the answer is a JSON object
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array"}},
                }
            },
            "response_format",
            '"type": "object", got "type": "array"',
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": CYCLE},
                }
            },
            "response_format",
            "no finite value",
        ),
        (  # named by the client's field, not by vLLM's structured_outputs.json
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "array", "uniqueItems": True}},
                        },
                    },
                }
            },
            "response_format",
            "response_format: the schema is not supported: Unimplemented keys",
        ),
        *(  # the path of the schema at fault, as OpenAI names it, whatever the choice
            (
                {
                    "tools": [_function({"type": "object"}, "e"), _function({"type": "string"})],
                    "tool_choice": choice,
                },
                "tools[1].function.parameters",
                "function 'f' parameters must be",
            )
            for choice in (
                "auto",
                "none",
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "e"}},
            )
        ),
        (
            {
                "tools": [
                    _function(
                        {
                            "type": "object",
                            "$defs": CYCLE["$defs"],
                            "properties": {"x": {"$ref": "#/$defs/a"}},
                            "required": ["x"],
                        }
                    )
                ]
            },
            "tools[0].function.parameters",
            "function 'f' parameters: the schema has no finite value",
        ),
        (  # the pattern and the cause, not the grammar the schema was compiled into
            {
                "tools": [
                    _function(
                        {"type": "object", "properties": {"x": {"type": "string", "pattern": "(a"}}}
                    )
                ]
            },
            "tools[0].function.parameters",
            "function 'f' parameters: the schema is not supported: "
            "regex parse error: (a (unclosed group)",
        ),
    ],
)
def test_schemas_no_object_can_match_are_400s_naming_the_schema(body, param, message):
    request = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body})
    with pytest.raises(APIError) as err:
        chat_structured_outputs(request, active_tools(request))
    assert err.value.status == 400 and err.value.param == param
    assert message in err.value.message


def test_json_object_needs_the_word_json_in_the_messages():
    """OpenAI's rule: json_object is refused unless a message asks for JSON by name."""
    fmt = {"response_format": {"type": "json_object"}}
    quiet = parse_chat_request({"messages": [{"role": "user", "content": "a city?"}], **fmt})
    with pytest.raises(APIError) as err:
        chat_structured_outputs(quiet, [])
    assert err.value.status == 400 and err.value.param == "messages"
    assert "'json'" in err.value.message
    told = [{"role": "system", "content": "Answer in Json."}, {"role": "user", "content": "city?"}]
    request = parse_chat_request({"messages": told, **fmt})
    assert chat_structured_outputs(request, []).json_object


def _closed(properties: dict, **extra) -> dict:
    """An object schema as OpenAI's strict mode requires it: closed, every property required."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **extra,
    }


STRING = {"type": "string"}
_TYPED = "schema must have a 'type' key."
_CLOSE = "'additionalProperties' is required to be supplied and to be false."
_REQUIRE = (
    "'required' is required to be supplied and to be an array including every key in properties."
)
# (a schema declared strict, the context OpenAI's 400 names, what it says there)
STRICT_VIOLATIONS = [
    ({"type": "object", "properties": {"city": STRING}, "required": ["city"]}, "()", _CLOSE),
    ({}, "()", _CLOSE),
    (
        {**_closed({"city": STRING, "unit": STRING}), "required": ["city"]},
        "()",
        f"{_REQUIRE} Missing 'unit'.",
    ),
    (
        {"type": "object", "properties": {"city": STRING}, "additionalProperties": False},
        "()",
        f"{_REQUIRE} Missing 'city'.",
    ),
    (
        {**_closed({"city": STRING}), "required": ["city", "country"]},
        "()",
        f"{_REQUIRE} Extra required key 'country' supplied.",
    ),
    ({"type": "object", "additionalProperties": False}, "()", "object schema missing properties."),
    (  # every object, however deep: a property's
        _closed(
            {"address": {"type": "object", "properties": {"zip": STRING}, "required": ["zip"]}}
        ),
        "('properties', 'address')",
        _CLOSE,
    ),
    (  # an array's items
        _closed(
            {"stops": {"type": "array", "items": {**_closed({"zip": STRING}), "required": []}}}
        ),
        "('properties', 'stops', 'items')",
        f"{_REQUIRE} Missing 'zip'.",
    ),
    (  # a branch of anyOf, a nullable object, a definition
        _closed(
            {"at": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"zip": STRING}}]}}
        ),
        "('properties', 'at', 'anyOf', '1')",
        _CLOSE,
    ),
    (
        _closed({"at": {"type": ["object", "null"], "properties": {"zip": STRING}}}),
        "('properties', 'at')",
        _CLOSE,
    ),
    (
        _closed({"at": {"$ref": "#/$defs/place"}}, **{"$defs": {"place": {"type": "object"}}}),
        "('$defs', 'place')",
        _CLOSE,
    ),
    # Every subschema names its type (an anyOf, a $ref or an enum stands for theirs),
    # wherever it is: a description alone, a const alone, the empty schema, properties alone.
    (_closed({"ok": {"description": "Whether it is."}}), "('properties', 'ok')", _TYPED),
    (_closed({"kind": {"const": "fact"}}), "('properties', 'kind')", _TYPED),
    (
        _closed({"tags": {"type": "array", "items": {}}}),
        "('properties', 'tags', 'items')",
        _TYPED,
    ),
    (
        _closed({"at": {"anyOf": [{"type": "null"}, {"properties": {"zip": STRING}}]}}),
        "('properties', 'at', 'anyOf', '1')",
        _TYPED,
    ),
    (
        _closed({"unit": {"$ref": "#/$defs/unit"}}, **{"$defs": {"unit": {"const": "C"}}}),
        "('$defs', 'unit')",
        _TYPED,
    ),
    (
        _closed({"address": _closed({"zip": {"pattern": "^[0-9]{5}$"}})}),
        "('properties', 'address', 'properties', 'zip')",
        _TYPED,
    ),
    # A boolean schema stands for no subschema (`true` lets anything through, `false`
    # nothing), wherever it is.
    (_closed({"ok": True}), "('properties', 'ok')", "schema must be a JSON object, got true."),
    (
        _closed({"tags": {"type": "array", "items": False}}),
        "('properties', 'tags', 'items')",
        "schema must be a JSON object, got false.",
    ),
    (
        _closed({"at": {"$ref": "#/$defs/at"}}, **{"$defs": {"at": True}}),
        "('$defs', 'at')",
        "schema must be a JSON object, got true.",
    ),
    # Keywords strict mode does not support, named where they are (before a missing type,
    # as OpenAI's 400 for an `items` of allOf alone does).
    (
        _closed({"tags": {"type": "array", "items": {"allOf": [STRING]}}}),
        "('properties', 'tags', 'items')",
        "'allOf' is not permitted.",
    ),
    (
        _closed({"id": {"oneOf": [STRING, {"type": "integer"}]}}),
        "('properties', 'id')",
        "'oneOf' is not permitted.",
    ),
    (
        _closed({"city": {"type": "string", "not": {"const": "Paris"}}}),
        "('properties', 'city')",
        "'not' is not permitted.",
    ),
    (
        _closed({"city": STRING}, **{"if": {"required": ["city"]}, "then": {}}),
        "()",
        "'if' is not permitted.",
    ),
    (_closed({}, patternProperties={"^x": STRING}), "()", "'patternProperties' is not permitted."),
    (
        _closed({"a": STRING, "b": STRING}, dependentRequired={"a": ["b"]}),
        "()",
        "'dependentRequired' is not permitted.",
    ),
    (
        _closed({"tags": {"type": "array", "items": STRING, "uniqueItems": True}}),
        "('properties', 'tags')",
        "'uniqueItems' is not permitted.",
    ),
]
# Strict schemas OpenAI accepts: closed objects with every property required (optional
# ones nullable), nested, in arrays, definitions and anyOf; an object without properties;
# typed enums and consts, and anyOf, $ref and enum without a type of their own.
STRICT_SCHEMAS = [
    _closed({"city": STRING}),
    _closed(
        {
            "unit": {"type": "string", "enum": ["C", "F"]},
            "kind": {"type": "string", "const": "fact"},
            "grade": {"type": ["integer", "null"], "enum": [1, 2, None]},
            "size": {"enum": ["S", "M", 3]},
            "id": {"anyOf": [STRING, {"type": "integer"}], "description": "Either."},
        }
    ),
    _closed({}),
    {"type": "object", "properties": {}, "additionalProperties": False},
    _closed(
        {
            "stops": {"type": "array", "items": {"$ref": "#/$defs/place"}},
            "at": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/place"}]},
            "note": {"type": ["string", "null"]},
        },
        **{"$defs": {"place": _closed({"zip": STRING, "street": STRING})}},
    ),
]


def _strict_tool(parameters: dict, strict: bool | None = True, name: str = "f") -> dict:
    function = {"name": name, "parameters": parameters}
    return {
        "type": "function",
        "function": function if strict is None else {**function, "strict": strict},
    }


def _strict_format(schema: dict, strict: bool | None = True) -> dict:
    spec = {"name": "answer", "schema": schema}
    return {
        "type": "json_schema",
        "json_schema": spec if strict is None else {**spec, "strict": strict},
    }


def _structure_error(**body) -> APIError | None:
    messages = [{"role": "user", "content": "hi, in JSON"}]
    request = parse_chat_request({"messages": messages, **body})
    try:
        chat_structured_outputs(request, active_tools(request))
    except APIError as exc:
        return exc
    return None


@pytest.mark.parametrize(("schema", "context", "rule"), STRICT_VIOLATIONS)
def test_a_strict_schema_outside_openais_strict_rules_is_its_400(schema, context, rule):
    """OpenAI's strict mode: every object closed (`additionalProperties: false`), with
    properties, each of them required. A function's (offered or not) or a format's schema
    that breaks it is the 400 OpenAI gives, naming where; without strict it is not held to
    them (only the grammar's own checks refuse one, a 400 still: a required key no
    property has, a keyword the grammar does not implement such as `not` or `if`)."""
    other = _strict_tool(_closed({}), name="e")
    for choice in ("auto", "none", {"type": "function", "function": {"name": "e"}}):
        err = _structure_error(tools=[other, _strict_tool(schema)], tool_choice=choice)
        assert err is not None and err.status == 400
        assert err.message == f"Invalid schema for function 'f': In context={context}, {rule}"
        assert (err.param, err.code) == (
            "tools[1].function.parameters",
            "invalid_function_parameters",
        )
    err = _structure_error(response_format=_strict_format(schema))
    assert err is not None and err.status == 400
    assert (
        err.message == f"Invalid schema for response_format 'answer': In context={context}, {rule}"
    )
    assert (err.param, err.code) == ("response_format", "invalid_json_schema")
    for strict in (False, None):
        for body in (
            {"tools": [_strict_tool(schema, strict)]},
            {"response_format": _strict_format(schema, strict)},
        ):
            err = _structure_error(**body)
            if err is not None:  # the grammar engine's own refusal, a 400 still
                assert err.status == 400 and not err.message.startswith("Invalid schema for")
                grammar_refuses = ("'country'", "Unimplemented keys")
                assert any(reason in err.message for reason in grammar_refuses), err.message


@pytest.mark.parametrize("schema", STRICT_SCHEMAS)
def test_schemas_within_openais_strict_rules_are_accepted(schema):
    assert _structure_error(tools=[_strict_tool(schema)], tool_choice="required") is None
    assert _structure_error(response_format=_strict_format(schema)) is None


# Subschemas with and without their types, objects closed or not, every property required
# or not: what a strict client might send, bounded so that a random walk ends soon.
_TYPED_LEAVES = st.one_of(
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 9}),
    st.sampled_from([{"type": "boolean"}, {"type": ["boolean", "null"]}, {"type": "null"}]),
    st.lists(st.sampled_from(["C", "F", "K"]), min_size=1, unique=True).map(
        lambda e: {"type": "string", "enum": e}
    ),
    st.sampled_from(["x", "y"]).map(lambda c: {"type": "string", "const": c}),
    st.just({"enum": ["C", 1, None]}),
)
# Subschemas without a type, each titled "untyped" (which no property's name can spell).
_UNTYPED_LEAVES = st.sampled_from([{"const": "x"}, {"maxLength": 3}, {"description": "any"}]).map(
    lambda leaf: {**leaf, "title": "untyped"}
)
# Keywords OpenAI's strict mode does not support, in a subschema that is otherwise fine,
# and boolean schemas: each the check must refuse.
_REFUSED_KEYWORDS = {
    "allOf": [{"minLength": 1}],
    "oneOf": [{"maxLength": 2}, {"minLength": 4}],
    "not": {"const": "x"},
    "if": {"minLength": 2},
    "then": {"maxLength": 3},
    "else": {"maxLength": 1},
    "dependentRequired": {},
    "patternProperties": {"^z": {"type": "string"}},
    "uniqueItems": True,
}
_REFUSED_LEAVES = st.one_of(
    st.booleans(),
    st.sampled_from(sorted(_REFUSED_KEYWORDS)).map(
        lambda key: {"type": "string", key: _REFUSED_KEYWORDS[key]}
    ),
)


def _strictish_object(children: st.SearchStrategy) -> st.SearchStrategy[dict]:
    def build(props: dict, closed: bool, all_required: bool, refused: dict) -> dict:
        required = list(props) if all_required else list(props)[1:]
        return {
            "type": "object",
            "properties": props,
            "required": required,
            **({"additionalProperties": False} if closed else {}),
            **refused,
        }

    mostly = st.sampled_from([True, True, True, False])
    names = st.text("abcdefgh_", min_size=1, max_size=5)
    rarely = st.sampled_from([{}] * 10 + [{"minProperties": 1}, {"dependentSchemas": {}}])
    return st.builds(build, st.dictionaries(names, children, max_size=3), mostly, mostly, rarely)


def _strictish(children: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.one_of(
        _strictish_object(children),
        children.map(lambda c: {"type": "array", "items": c, "maxItems": 2}),
        st.lists(children, min_size=2, max_size=2).map(lambda b: {"anyOf": b}),
    )


STRICTISH = _strictish_object(
    st.recursive(
        st.one_of(_TYPED_LEAVES, _TYPED_LEAVES, _TYPED_LEAVES, _UNTYPED_LEAVES, _REFUSED_LEAVES),
        _strictish,
        max_leaves=5,
    )
)


def _positions(node: object) -> list[object]:
    """What stands in each subschema's place in a STRICTISH schema (the root, properties,
    items, anyOf branches)."""
    if not isinstance(node, dict):
        return [node]
    children = [*node.get("properties", {}).values(), *node.get("anyOf", [])]
    children += [node["items"]] if "items" in node else []
    return [node, *(p for child in children for p in _positions(child))]


def _walk(compiler, structure, rnd: random.Random) -> str:
    """An output the grammar allows: a token drawn at random from those it allows, each
    step, the end of the output as soon as it may end."""
    tok, grammars = compiler
    matcher, ids = grammars.compile(structure), []
    vocab = tok.backend.get_vocab_size()
    while not matcher.is_stopped() and len(ids) < 400:
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[:vocab])
        ends = sorted(set(tok.stop_token_ids) & set(allowed.tolist()))
        token = ends[0] if ends else int(rnd.choice(allowed))
        assert matcher.consume_token(token)
        ids.append(token)
    assert matcher.is_stopped()
    return tok.decode([i for i in ids if i not in tok.stop_token_ids])


@settings(max_examples=60, deadline=None)
@given(STRICTISH, st.randoms(use_true_random=False))
def test_what_the_strict_check_accepts_compiles_and_its_outputs_validate(compiler, schema, rnd):
    """A strict schema the check accepts has no subschema without its type, none that is
    a boolean schema or uses a keyword strict mode does not support, compiles for the
    model's vocabulary, and what its grammar writes validates against it; one it refuses
    is refused naming a subschema the schema has."""
    messages = [{"role": "user", "content": "hi, in JSON"}]
    request = parse_chat_request({"messages": messages, "response_format": _strict_format(schema)})
    try:
        structure = chat_structured_outputs(request, [])
    except APIError as exc:
        context = re.match(
            r"Invalid schema for response_format 'answer': In context=(\(.*?\)), ", exc.message
        )
        assert context is not None, exc.message
        node = schema
        for key in ast.literal_eval(context.group(1)):
            node = node[int(key)] if isinstance(node, list) else node[key]
        assert any(node is position for position in _positions(schema))
        return
    assert "untyped" not in json.dumps(schema)
    for position in _positions(schema):
        assert isinstance(position, dict) and not _REFUSED_KEYWORDS.keys() & position.keys()
        assert not {"minProperties", "dependentSchemas"} & position.keys()
    jsonschema.validate(json.loads(_walk(compiler, structure, rnd)), schema)
