"""text.format and function tools in /v1/responses: the structure each request asks for
reaches the engine (scripted engine, real store), and the grammar it carries, run on
llguidance with the default model's tokenizer, lets through exactly the valid outputs."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.responses import Response

from tests.conftest import record_event_loop_calls
from tests.product.conftest import ProductServer
from tests.product.test_responses_tools import CALCULATOR, _call, _scripted
from tests.server.fake_engine import FakeEngine
from tests.server.test_structured import compiler  # noqa: F401  (the module fixture)

MODEL = "fake-model"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "parameters": CITY}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
JSON_SCHEMA = {"type": "json_schema", "name": "place", "schema": CITY, "strict": True}


def _create(server: ProductServer, **body) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/responses",
        timeout=10,
        json={"model": MODEL, "input": "Weather in Paris?", **body},
    )


def _accepts(compiler, structure, text: str) -> bool:  # noqa: F811
    tok, grammars = compiler
    matcher = grammars.compile(structure)
    ids = tok.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids)


def test_json_schema_format_reaches_the_engine_and_is_echoed(product_server, compiler):  # noqa: F811
    server = product_server(FakeEngine(reply='{"city": "Paris"}'))
    raw = _create(server, text={"format": JSON_SCHEMA})
    assert raw.status_code == 200, raw.text
    response = Response.model_validate(raw.json())
    assert response.text.format.type == "json_schema"
    assert (response.text.format.name, response.text.format.schema_) == ("place", CITY)
    assert server.client.responses.retrieve(response.id).text == response.text
    structure = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, structure, '{"city": "Paris"}')
    assert not _accepts(compiler, structure, '{"town": "Paris"}')
    assert not _accepts(compiler, structure, "Paris")


def test_a_turns_grammar_is_built_off_the_event_loop(product_server, monkeypatch):
    """At create (the schema checked before any output) and for each model turn, the
    grammar is built in a worker thread: a large schema's takes up to a second."""
    from engine.structured_output import StructuredOutputsParams

    built_on_loop = record_event_loop_calls(monkeypatch, StructuredOutputsParams, "__post_init__")
    server = product_server(FakeEngine(reply='{"city": "Paris"}'))
    assert _create(server, text={"format": JSON_SCHEMA}).status_code == 200
    assert len(built_on_loop) >= 2 and not any(built_on_loop)


def test_json_object_format_allows_any_object_only(product_server, compiler):  # noqa: F811
    server = product_server(FakeEngine(reply="{}"))
    response = server.client.responses.create(
        model=MODEL,
        input="x",
        instructions="Reply in JSON.",
        text={"format": {"type": "json_object"}},
    )
    assert response.text.format.type == "json_object"
    structure = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, structure, '{"any": [1, 2]}')
    assert not _accepts(compiler, structure, "[1, 2]")


def test_json_object_format_needs_the_word_json_in_the_context(product_server):
    server = product_server(FakeEngine(reply="{}"))
    raw = _create(server, text={"format": {"type": "json_object"}})
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"] == "input" and "'json'" in raw.json()["error"]["message"]
    assert server.engine.params == []
    first = server.client.responses.create(model=MODEL, input="Give the city as JSON.")
    later = _create(
        server,
        previous_response_id=first.id,
        input="And now?",
        text={"format": {"type": "json_object"}},
    )
    assert later.status_code == 200, later.text  # an earlier message of the context asked
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": "Reply in JSON."}
    tool = _create(server, input=[call, result], text={"format": {"type": "json_object"}})
    assert tool.status_code == 200, tool.text  # a tool's result asked, as in chat


def test_text_format_and_no_tools_leave_the_output_free(product_server):
    server = product_server(FakeEngine(reply="Hi"))
    server.client.responses.create(model=MODEL, input="x", text={"format": {"type": "text"}})
    server.client.responses.create(model=MODEL, input="x", tools=[WEATHER], tool_choice="none")
    assert [p.structured_outputs for p in server.engine.params] == [None, None]


def test_required_and_named_tool_choice_force_valid_calls(product_server, compiler):  # noqa: F811
    server = product_server(FakeEngine(reply=CALL))
    response = server.client.responses.create(
        model=MODEL, input="x", tools=[WEATHER, TIME], tool_choice="required"
    )
    call = response.output[0]
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call",
        "get_weather",
        {"city": "Paris"},
    )
    required = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, required, CALL) and _accepts(compiler, required, TIME_CALL)
    assert not _accepts(compiler, required, "Sure. " + CALL)
    assert not _accepts(compiler, required, CALL.replace('"Paris"', "3"))
    assert _accepts(compiler, required, CALL + "\n" + TIME_CALL)  # parallel calls
    # parallel_tool_calls false: one call, streamed or not
    for stream in (False, True):
        with httpx.stream(
            "POST",
            f"{server.url}/v1/responses",
            timeout=10,
            json={
                "model": MODEL,
                "input": "x",
                "tools": [WEATHER, TIME],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "stream": stream,
            },
        ) as raw:
            assert raw.status_code == 200, raw.read()
        single = server.engine.params[-1].structured_outputs
        assert _accepts(compiler, single, CALL)
        assert not _accepts(compiler, single, CALL + "\n" + TIME_CALL)
    server.client.responses.create(
        model=MODEL,
        input="x",
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "name": "get_time"},
    )
    named = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, named, TIME_CALL) and not _accepts(compiler, named, CALL)


def test_auto_tool_choice_triggers_the_call_grammar_lazily(product_server, compiler):  # noqa: F811
    server = product_server(FakeEngine(reply="Let me see."))
    server.client.responses.create(model=MODEL, input="x", tools=[WEATHER])
    auto = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, auto, "Any text, {even} this.")
    assert _accepts(compiler, auto, "Let me check.\n" + CALL)
    assert not _accepts(compiler, auto, "x " + CALL.replace('"Paris"', "[]"))


def test_allowed_tools_lists_every_tool_and_lets_only_the_allowed_be_called(
    product_server,
    compiler,  # noqa: F811
):
    """The Open Responses spec's (and OpenAI's) `tool_choice: {"type": "allowed_tools"}`:
    the prompt lists every tool (its prefix, cached, stays the same as the allowed set
    changes), and the grammar lets the model call only the allowed ones, "auto" (text or
    their calls) or "required" (their calls), on every generation of the response. It is
    echoed as given; one naming no tool of the request is a 400 naming tool_choice."""
    server = product_server(FakeEngine(reply=_scripted(TIME_CALL)))
    allowed = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    response = server.client.responses.create(
        model=MODEL, input="x", tools=[WEATHER, TIME, CALCULATOR], tool_choice=allowed
    )
    assert response.tool_choice.model_dump() == allowed
    assert [item.type for item in response.output] == ["function_call"]
    prompt = server.engine.tokenizer.decode(server.engine.prompts[-1])
    assert "get_weather" in prompt and "get_time" in prompt
    required = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, required, TIME_CALL)
    assert not _accepts(compiler, required, CALL)
    assert not _accepts(compiler, required, "Any text.")
    auto = {**allowed, "mode": "auto", "tools": [{"type": "function", "name": "calculator"}]}
    calc = _call("calculator", expression="6 * 7")
    server.engine.reply = _scripted("Let me see. " + calc)
    answered = server.client.responses.create(
        model=MODEL, input="x", tools=[WEATHER, TIME, CALCULATOR], tool_choice=auto
    )
    assert [item.type for item in answered.output][:2] == ["message", "function_call"]
    first, later = server.engine.params[-2:]  # the call, then the answer after its result
    for structure in (first.structured_outputs, later.structured_outputs):
        assert _accepts(compiler, structure, "Some text.")
        assert not _accepts(compiler, structure, "Let me check.\n" + CALL)
        assert _accepts(compiler, structure, "Let me see.\n" + calc)
    for bad in (
        {**allowed, "tools": [{"type": "function", "name": "nope"}]},
        {**allowed, "mode": "sometimes"},
        {**allowed, "tools": []},
        {**allowed, "tools": [{"type": "web_search"}]},
    ):
        raw = _create(server, tools=[WEATHER, TIME], tool_choice=bad)
        assert raw.status_code == 400, (bad, raw.text)
        assert raw.json()["error"]["param"] == "tool_choice", raw.text
    # A tool left out of the calls still has its schema checked, as any declared one.
    unusable = {**WEATHER, "parameters": {"type": "array", "uniqueItems": True}}
    raw = _create(server, tools=[unusable, TIME], tool_choice=allowed)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "tools[0].parameters"


@pytest.mark.parametrize(
    ("fmt", "extra", "param"),
    [
        (
            {**JSON_SCHEMA, "schema": {"type": "array", "uniqueItems": True}},
            {},
            "text.format.schema",
        ),
        (
            {**JSON_SCHEMA, "schema": {"type": "array", "uniqueItems": True}},
            {"tools": [WEATHER]},
            "text.format.schema",
        ),
        (  # a function's schema is named by its path
            {"type": "text"},
            {"tools": [CALCULATOR, {**WEATHER, "parameters": {"type": "array"}}]},
            "tools[1].parameters",
        ),
        (  # whatever the tool_choice: a later generation may offer the function
            {"type": "text"},
            {
                "tools": [CALCULATOR, {**WEATHER, "parameters": {"type": "array"}}],
                "tool_choice": {"type": "function", "name": CALCULATOR["name"]},
            },
            "tools[1].parameters",
        ),
        (
            {"type": "text"},
            {"tools": [{**WEATHER, "parameters": {"type": "array"}}], "tool_choice": "none"},
            "tools[0].parameters",
        ),
        ({"type": "json_schema", "schema": CITY}, {}, "text.format.name"),
        ({"type": "json_schema", "name": "place"}, {}, "text.format.schema"),
        ({"type": "json_schema", "name": "a place", "schema": CITY}, {}, "text.format.name"),
        ({"type": "json_object", "schema": CITY}, {}, "text.format.schema"),
        ({"type": "yaml"}, {}, "text.format.type"),
    ],
)
def test_bad_formats_are_400s_naming_the_field(product_server, fmt, extra, param):
    server = product_server()
    raw = _create(server, text={"format": fmt}, **extra)
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"] == param
    assert server.engine.params == []


def test_a_forced_call_with_a_format_calls_then_answers_in_the_format(
    product_server,
    compiler,  # noqa: F811
):
    """What instructor's RESPONSES_TOOLS mode and the Agents SDK's output_type send: a
    forced call's turn writes the call alone, and the answer after the tool ran follows
    text.format, as in OpenAI's API."""
    answer = '{"city": "12"}'
    scripted = _scripted(_call("calculator", expression="3*4"), answer='{{"city": "{}"}}')
    server = product_server(FakeEngine(reply=scripted))
    response = server.client.responses.create(
        model=MODEL,
        input="What is 3*4? Answer as the place.",
        tools=[CALCULATOR],
        tool_choice="required",
        text={"format": JSON_SCHEMA},
    )
    assert [item.type for item in response.output] == [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert json.loads(response.output_text) == {"city": "12"}
    forced, answering = (p.structured_outputs for p in server.engine.params)
    call = _call("calculator", expression="3*4")
    assert _accepts(compiler, forced, call) and not _accepts(compiler, forced, answer)
    assert _accepts(compiler, answering, answer) and not _accepts(compiler, answering, "12")


def test_strict_schemas_outside_openais_strict_rules_are_its_400s(product_server):
    """A function or text.format declared strict whose schema leaves an object open, a
    property optional, a subschema without its type, a boolean schema or a keyword strict
    mode does not support is OpenAI's 400, naming where; declared otherwise, it runs."""
    server = product_server(FakeEngine(reply='{"city": "Paris"}'))
    open_place = {"type": "object", "properties": {"city": {"type": "string"}}}
    optional = {**CITY, "properties": {**CITY["properties"], "zip": {"type": "string"}}}
    untyped = {**CITY, "properties": {"city": {"const": "Paris"}}}
    anything = {**CITY, "properties": {"city": True}}  # a boolean schema
    composed = {**CITY, "properties": {"city": {"allOf": [{"type": "string"}]}}}
    rule = "'additionalProperties' is required to be supplied and to be false."
    typed = "schema must have a 'type' key."
    for body, error in (
        (
            {"tools": [CALCULATOR, {**WEATHER, "parameters": open_place, "strict": True}]},
            {
                "message": f"Invalid schema for function 'get_weather': In context=(), {rule}",
                "param": "tools[1].parameters",
                "code": "invalid_function_parameters",
            },
        ),
        (
            {
                "tools": [{**WEATHER, "parameters": optional, "strict": True}],
                "tool_choice": "none",
            },
            {
                "message": "Invalid schema for function 'get_weather': In context=(), 'required' "
                "is required to be supplied and to be an array including every key in "
                "properties. Missing 'zip'.",
                "param": "tools[0].parameters",
                "code": "invalid_function_parameters",
            },
        ),
        (
            {
                "text": {
                    "format": {
                        **JSON_SCHEMA,
                        "schema": {"type": "object", "properties": {"a": open_place}},
                    }
                }
            },
            {
                "message": "Invalid schema for response_format 'place': In context=(), " + rule,
                "param": "text.format.schema",
                "code": "invalid_json_schema",
            },
        ),
        (
            {"tools": [CALCULATOR, {**WEATHER, "parameters": untyped, "strict": True}]},
            {
                "message": "Invalid schema for function 'get_weather': "
                f"In context=('properties', 'city'), {typed}",
                "param": "tools[1].parameters",
                "code": "invalid_function_parameters",
            },
        ),
        (
            {"text": {"format": {**JSON_SCHEMA, "schema": untyped}}},
            {
                "message": "Invalid schema for response_format 'place': "
                f"In context=('properties', 'city'), {typed}",
                "param": "text.format.schema",
                "code": "invalid_json_schema",
            },
        ),
        (
            {"tools": [{**WEATHER, "parameters": anything, "strict": True}]},
            {
                "message": "Invalid schema for function 'get_weather': "
                "In context=('properties', 'city'), schema must be a JSON object, got true.",
                "param": "tools[0].parameters",
                "code": "invalid_function_parameters",
            },
        ),
        (
            {"text": {"format": {**JSON_SCHEMA, "schema": composed}}},
            {
                "message": "Invalid schema for response_format 'place': "
                "In context=('properties', 'city'), 'allOf' is not permitted.",
                "param": "text.format.schema",
                "code": "invalid_json_schema",
            },
        ),
    ):
        raw = _create(server, **body)
        assert raw.status_code == 400, raw.text
        assert raw.json() == {"error": {**error, "type": "invalid_request_error"}}
    assert server.engine.params == []
    loose = {"tools": [{**WEATHER, "parameters": open_place, "strict": False}]}
    assert _create(server, **loose).status_code == 200
    loose_format = {**JSON_SCHEMA, "schema": open_place, "strict": False}
    assert _create(server, text={"format": loose_format}).status_code == 200
    untyped_format = {**JSON_SCHEMA, "schema": untyped, "strict": False}
    assert _create(server, text={"format": untyped_format}).status_code == 200
    for schema in (anything, composed):  # the grammar enforces both
        assert _create(server, text={"format": {**untyped_format, "schema": schema}}).is_success


def test_text_after_function_calls_cannot_write_the_servers_markup(product_server, compiler):  # noqa: F811
    """The Agents SDK's turn after its function ran: the call and its output in the input,
    the function still offered. The answer cannot open with `<` (the default model wrote
    `<tool_response>` and the results' `<untrusted ...>` frame here) nor write the
    protocol's tags or the frame later on, and a call needs text before it; a later turn
    without tools whose history shows the call cannot write the markup either."""
    server = product_server(FakeEngine(reply="It is 18C."))
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather"}
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {**call, "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]
    first = server.client.responses.create(model=MODEL, input=items, tools=[WEATHER])
    answer = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, answer, "It is 18C in Paris.")
    assert _accepts(compiler, answer, "Let me check again.\n" + CALL)
    for markup in ("<tool_response>\n", '<untrusted origin="tool get_weather"', "(Data from"):
        assert not _accepts(compiler, answer, markup)
        assert not _accepts(compiler, answer, f"It is 18C.\n{markup}")
    assert not _accepts(compiler, answer, CALL)
    server.client.responses.create(model=MODEL, input="And Rome?", previous_response_id=first.id)
    later = server.engine.params[-1].structured_outputs
    assert _accepts(compiler, later, "<b>Rome</b> is warmer.")
    assert not _accepts(compiler, later, "Rome: </tool_response>")
    server.client.responses.create(model=MODEL, input="Hi!")
    assert server.engine.params[-1].structured_outputs is None
