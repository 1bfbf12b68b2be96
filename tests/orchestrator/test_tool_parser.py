"""Tool-call parsing: whole-text and streamed results agree, nothing is dropped."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.tool_parser import (
    ArgumentsDelta,
    CallStart,
    Content,
    ParsedCall,
    TextPiece,
    ToolCallParser,
    parse_tool_calls,
)
from server.chat import ChoiceAssembler

TOOLS = ["get_weather", "get_time"]
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'


def test_single_call_is_extracted_with_arguments_as_json_text():
    content, calls = parse_tool_calls(WEATHER, TOOLS)
    assert content.strip() == ""
    assert calls == [ParsedCall("get_weather", '{"city": "Paris"}')]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_parallel_calls_keep_their_order_and_surrounding_text():
    content, calls = parse_tool_calls("Let me check. " + WEATHER + "\n" + TIME, TOOLS)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert content.startswith("Let me check. ")


def test_unparseable_block_is_returned_as_text():
    broken = '<tool_call>{"name": "get_weather", "arguments" {"city": </tool_call>'
    content, calls = parse_tool_calls("before " + broken + " after", TOOLS)
    assert calls == []
    assert content == "before " + broken + " after"


def test_call_to_undeclared_function_is_text():
    block = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(block, TOOLS)
    assert calls == [] and content == block


def test_arguments_given_as_json_string_are_accepted_but_not_other_types():
    ok = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
    assert parse_tool_calls(ok, TOOLS)[1] == [ParsedCall("get_time", '{"tz": "CET"}')]
    bad = '<tool_call>{"name": "get_time", "arguments": [1, 2]}</tool_call>'
    assert parse_tool_calls(bad, TOOLS) == (bad, [])


def test_a_block_nested_past_the_json_decoders_depth_is_text_not_a_failure():
    """A model may write arguments nested thousands deep (a client function's free-form
    object lets the grammar accept them); json.loads raises RecursionError on them, which
    failed the request (a 500, or a response left in_progress)."""
    deep = "[" * 5000 + "]" * 5000
    plain = '<tool_call>{"name":"get_time","arguments":{"x": ' + deep + "}}</tool_call>"
    assert parse_tool_calls(plain, TOOLS) == (plain, [])
    text = '<tool_call>{"name": "get_time", "arguments": "' + deep + '"}</tool_call>'
    assert parse_tool_calls(text, TOOLS) == (text, [])
    canonical = '<tool_call>{"name": "get_time", "arguments": {"x": ' + deep + "}}</tool_call>"
    _, calls = parse_tool_calls(canonical, TOOLS)
    assert [(c.name, c.complete) for c in calls] == [("get_time", False)]


def test_unclosed_final_block_counts_if_it_parses_else_is_text():
    unclosed = '<tool_call>{"name": "get_time", "arguments": {}}'
    assert parse_tool_calls(unclosed, TOOLS)[1] == [ParsedCall("get_time", "{}")]
    truncated = '<tool_call>{"name": "get_time", "argu'
    assert parse_tool_calls(truncated, TOOLS) == (truncated, [])


def test_canonical_call_streams_its_arguments_before_the_block_closes():
    parser = ToolCallParser(TOOLS)
    events = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert events == [CallStart("get_weather"), ArgumentsDelta('{"city": "Pa')]
    # The last `}` may close the wrapping object and `</tool` may open the closing tag.
    assert parser.feed('ris"}') == [ArgumentsDelta('ris"')]
    assert parser.feed("}\n</tool") == [ArgumentsDelta("}")]
    assert parser.feed("_call>") == [ParsedCall("get_weather", '{"city": "Paris"}')]


def test_truncated_canonical_call_keeps_the_arguments_it_has():
    """The budget ran out mid-call: the call stands with what was generated, streamed or
    not, as OpenAI returns a truncated call with finish_reason "length"."""
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"tz', TOOLS)
    assert content == "" and calls == [ParsedCall("get_time", '{"tz', complete=False)]


def test_a_call_cut_inside_its_closing_tag_has_only_its_arguments():
    """The budget ran out in `</tool_call>`: the call is whole, and what was written of
    the tag is neither arguments nor text, streamed or not."""
    for cut in range(1, len("</tool_call>")):
        text = WEATHER[:-cut]
        assert parse_tool_calls(text, TOOLS) == (
            "",
            [ParsedCall("get_weather", '{"city": "Paris"}')],
        )
        parser = ToolCallParser(TOOLS)
        deltas = [
            e.text for e in parser.feed(text) + parser.finish() if isinstance(e, ArgumentsDelta)
        ]
        assert "".join(deltas) == '{"city": "Paris"}'


def test_partial_tag_is_held_back_until_it_is_known_not_to_be_a_tag():
    parser = ToolCallParser(TOOLS)
    assert [e.text for e in parser.feed("a <tool_")] == ["a "]
    assert [e.text for e in parser.feed("x> b")] == ["<tool_x> b"]
    assert [e.text for e in parser.feed("c <")] == ["c "]
    assert [e.text for e in parser.finish()] == ["<"]


def test_a_closing_tag_inside_an_argument_string_does_not_end_the_call():
    """The call grammar lets a string argument hold `</tool_call>` (even after an escaped
    quote); only the tag outside the JSON closes the block."""
    arguments = {"tz": 'a</tool_call>b\\"</tool_call>'}
    text = (
        '<tool_call>\n{"name": "get_time", "arguments": '
        + json.dumps(arguments)
        + "}\n</tool_call> after"
    )
    for pieces in ([text], list(text)):
        parser = ToolCallParser(TOOLS)
        events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
        calls = [e for e in events if isinstance(e, ParsedCall)]
        assert [(c.name, json.loads(c.arguments), c.complete) for c in calls] == [
            ("get_time", arguments, True)
        ]
        assert "".join(e.text for e in events if isinstance(e, TextPiece)) == " after"


def test_a_call_the_budget_cut_before_its_name_is_dropped_not_shown_as_text():
    """Markup of a call that never got its name is no answer; a named one stays, cut (its
    arguments begun or not)."""
    for text in ("<tool_", "<tool_call>", '<tool_call>\n{"name": "get_w'):
        _, events = _finished("Here. " + text, cut=True)
        assert events == [TextPiece("Here. ")]
        # a generation that ended by itself keeps the text as the model wrote it
        _, events = _finished("Here. " + text, cut=False)
        assert "".join(e.text for e in events) == "Here. " + text
    _, events = _finished(WEATHER + '\n<tool_call>\n{"name": "get_t', cut=True)
    assert [e.name for e in events if isinstance(e, ParsedCall)] == ["get_weather"]
    _, events = _finished(WEATHER + '\n<tool_call>\n{"name": "get_time", "argu', cut=True)
    calls = [(e.name, e.complete) for e in events if isinstance(e, ParsedCall)]
    assert calls == [("get_weather", True), ("get_time", False)]
    # named whole, cut before its arguments' `{`: that function's call, with none yet
    _, events = _finished('<tool_call>\n{"name": "get_time", "arguments": ', cut=True)
    assert events == [ParsedCall("get_time", "", complete=False)]
    _, events = _finished('<tool_call>\n{"name": "get_date", "arguments": ', cut=True)
    assert events == []  # a function not offered: unknown
    _, events = _finished('<tool_call>\n{"name": "get_time", "arguments": {"tz": "U', cut=True)
    (call,) = [e for e in events if isinstance(e, ParsedCall)]
    assert (call.name, call.arguments, call.complete) == ("get_time", '{"tz": "U', False)


def test_a_forced_call_the_budget_cut_before_its_name_is_that_functions_call():
    """The tool choice named the function: a cut before its name is still its call, with
    no arguments yet; a later call cut that way (a second one) is unknown, so dropped."""
    named = '<tool_call>\n{"name": "get_weather", "arguments": '  # no `{` yet
    for text in ("<tool_", "<tool_call>", '<tool_call>\n{"name": "get_w', named):
        parser = ToolCallParser(TOOLS, forced="get_weather")
        events = parser.feed(text) + parser.finish(cut=True)
        assert events == [ParsedCall("get_weather", "", complete=False)], text
        assert not parser.dropped_cut_call
    parser = ToolCallParser(TOOLS, forced="get_weather")
    events = parser.feed(WEATHER + "\n<tool_") + parser.finish(cut=True)
    assert [e.complete for e in events if isinstance(e, ParsedCall)] == [True]
    assert parser.dropped_cut_call


def _finished(text: str, cut: bool) -> tuple[ToolCallParser, list]:
    parser = ToolCallParser(TOOLS)
    events = parser.feed(text) + parser.finish(cut)
    return parser, [e for e in events if not isinstance(e, CallStart | ArgumentsDelta)]


def test_max_calls_turns_extra_calls_into_text():
    content, calls = parse_tool_calls(WEATHER + TIME, TOOLS, max_calls=1)
    assert [c.name for c in calls] == ["get_weather"]
    assert content == TIME


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


SAMPLES = [
    "plain answer with no calls",
    "Sure!  " + WEATHER + "\n\n" + TIME + "\n",
    "x <tool_call>{oops}</tool_call> y " + WEATHER,
    "<tool_ca not a tag " + TIME + " trailing text  ",
    WEATHER + '\n<tool_call>{"name": "get_time", "arguments": {}}',
    '<tool_call>{"name": "get_time", "arguments": {"tz": "U</tool_call> then ' + WEATHER,
    WEATHER + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lo',
    TIME + "\n" + WEATHER[:-4],
    # a call repeated (spaced otherwise), then more: the repeat ends the choice
    WEATHER + "\n" + TIME + "\n" + TIME.replace('{"tz"', '{ "tz"') + " then " + WEATHER,
    WEATHER + "\n" + WEATHER[:-4],
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(min_value=0), max_size=12))
def test_streamed_parsing_matches_whole_text_for_any_delta_boundaries(text, cuts):
    whole = ChoiceAssembler(TOOLS, None).push(text, final=True)
    assembler = ChoiceAssembler(TOOLS, None)
    pieces = _split(text, cuts)
    streamed = []
    for i, piece in enumerate(pieces):
        streamed += assembler.push(piece, final=i == len(pieces) - 1)

    def normal(items):
        return (
            "".join(p for p in items if isinstance(p, str)),
            [p for p in items if isinstance(p, ParsedCall)],
        )

    assert normal(streamed) == normal(whole)
    # Each content piece knows where it stands in the text (what places its logprobs).
    for p in [*whole, *streamed]:
        assert not isinstance(p, str) or text[p.start : p.start + len(p)] == p
    # What a stream sends of a call (its argument deltas, or all at once) is the call.
    sent = [p.arguments for p in streamed if isinstance(p, ParsedCall) and not p.streamed]
    deltas = "".join(p.text for p in streamed if isinstance(p, ArgumentsDelta))
    streamed_args = [p.arguments for p in streamed if isinstance(p, ParsedCall) and p.streamed]
    assert deltas == "".join(streamed_args) and len(sent) + len(streamed_args) == len(
        normal(whole)[1]
    )


def test_a_call_repeating_an_earlier_one_ends_the_choice():
    """The same function with equal arguments (spaced otherwise) ends the choice, dropped
    with all that follows; `true` is not `1`, and a cut call repeats nothing. The first
    call streams; a later one is sent whole, so that no stream sends a repeat's head."""
    flag = '<tool_call>{"name": "get_time", "arguments": {"tz": true}}</tool_call>'
    one = flag.replace("true", "1")
    assembler = ChoiceAssembler(TOOLS, None)
    first = assembler.push("Let me see. " + WEATHER[:-20], final=False)
    assert [type(p) for p in first] == [Content, CallStart, ArgumentsDelta]
    assert not any(isinstance(p, CallStart) for p in assembler.push(WEATHER[-20:], final=False))
    assert assembler.push(flag[:-20], final=False) == []  # held until whole
    made = assembler.push(flag[-20:] + one, final=False)
    assert [p.arguments for p in made if isinstance(p, ParsedCall)] == ['{"tz": true}', '{"tz": 1}']
    assert not assembler.repeated
    again = WEATHER.replace('{"city": "Paris"}', '{ "city":"Paris" }')
    assert assembler.push(again + "It is sunny.", final=False) == []
    assert assembler.repeated and assembler.push(" More.", final=True) == []
    assert assembler.num_calls == 3 and assembler.calls_complete
    cut = ChoiceAssembler(TOOLS, None).push(WEATHER + WEATHER[:-20], final=True, cut=True)
    assert [p.complete for p in cut if isinstance(p, ParsedCall)] == [True, False]


def test_assembler_drops_only_whitespace_next_to_calls():
    items = ChoiceAssembler(TOOLS, None).push("Checking.\n" + WEATHER + "\n", final=True)
    assert items[0] == "Checking."
    assert [type(i) for i in items[1:]] == [CallStart, ArgumentsDelta, ParsedCall]
    plain = ChoiceAssembler(TOOLS, None).push("  spaced out  ", final=True)
    assert "".join(plain) == "  spaced out  "


def test_assembler_without_tools_passes_text_through():
    assert ChoiceAssembler([], None).push(WEATHER, final=False) == [WEATHER]


def test_an_engine_delta_finish_reason_says_whether_it_ends_or_cuts_the_choice():
    """`push_delta` reads an engine delta's finish reason: none holds trailing space back
    for what follows, "stop" ends the choice, "length" cuts it (a nameless call dropped)."""
    nameless = 'Here. <tool_call>\n{"na'
    assert ChoiceAssembler(TOOLS, None).push_delta("Here.  ", None) == ["Here."]
    assert ChoiceAssembler(TOOLS, None).push_delta("Here.  ", "stop") == ["Here.", "  "]
    assert "".join(ChoiceAssembler(TOOLS, None).push_delta(nameless, "length")) == "Here. "
    assert "".join(ChoiceAssembler(TOOLS, None).push_delta(nameless, "stop")) == nameless


def test_content_pieces_know_their_place_in_the_text_whatever_the_parser_took_out():
    """Text around calls, a block given back as text, the space after a cut call's
    dropped `<tool_`: each piece starts where the text pushed has it."""
    for text, shown in (
        (
            "Checking.\n" + WEATHER + "\n x <tool_call>{oops}</tool_call> y  <tool_",
            "Checking.\n x <tool_call>{oops}</tool_call> y",
        ),
        ("Hi  <tool_", "Hi  "),
    ):
        assembler = ChoiceAssembler(TOOLS, None)
        pieces = [*assembler.push(text[:30], False), *assembler.push_delta(text[30:], "length")]
        content = [p for p in pieces if isinstance(p, str)]
        assert "".join(content) == shown
        assert [text[p.start : p.start + len(p)] for p in content] == content
