"""Find `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in model output.

This is the Hermes/Qwen convention (Qwen2.5 and Qwen3 templates ask for it natively;
our default tool prompt asks other models for it too). One incremental parser serves
both the streaming and the whole-text case, so the two can never disagree.

Text outside the blocks passes through as soon as it cannot be the start of a
`<tool_call>` tag. A block that opens the way the tool-call grammar writes it,
`{"name": "<allowed function>", "arguments": {`, is a call from there on: its arguments
stream out as they arrive (`CallStart`, then `ArgumentsDelta`s), since under the grammar
(orchestrator/output_structure.py) they always complete validly unless the token budget runs out.
Any other block is held until it closes and is then either a call (if its body is a JSON
object naming an allowed function, with object arguments) or given back verbatim as text:
a malformed call is never dropped, and a stream never sends a call it would later have to
take back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# What the grammar writes after OPEN_TAG, up to the arguments object's opening brace.
CALL_PREFIX = '{{"name": "{name}", "arguments": '
_CANONICAL_START = re.compile(r'\s*\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": (?=\{)')
# A call's opening with its name written whole, however far its arguments got.
_NAMED = re.compile(r'\s*\{"name": "([a-zA-Z0-9_-]{1,64})"')
# A JSON string (its closing quote may not have come yet) or the closing tag.
_STRING_OR_CLOSE = re.compile(r'"(?:[^"\\]|\\.)*"?|' + re.escape(CLOSE_TAG))


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object
    # Its CallStart and ArgumentsDelta events came before it (how, not what: not compared).
    streamed: bool = field(default=False, compare=False)
    # False when the choice ended inside the arguments (the token budget, or a stop
    # string the client gave): they are what was written.
    complete: bool = True


@dataclass
class CallStart:
    """A call has begun; its arguments follow as ArgumentsDelta events."""

    name: str


@dataclass
class ArgumentsDelta:
    text: str


@dataclass
class TextPiece:
    text: str
    start: int = field(default=0, compare=False)  # where it starts in the text fed


class Content(str):
    """A piece of a choice's content, with where it starts in the choice's raw text (the
    text fed, tool-call blocks and the whitespace beside them included): what places
    its tokens' logprobs (orchestrator/logprobs.py, `TextLogprobs`)."""

    start: int

    def __new__(cls, text: str, start: int) -> Content:
        piece = super().__new__(cls, text)
        piece.start = start
        return piece


ToolEvent = TextPiece | ParsedCall | CallStart | ArgumentsDelta


def parse_call(body: str, allowed: Collection[str]) -> ParsedCall | None:
    """The call in one block's body, or None if it is not a valid call to an allowed tool
    (JSON nested past what the decoder's recursion allows is not one: a model may write it,
    and a client function's free-form arguments let the call grammar accept it)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("name") not in allowed:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def first_call_function(mode: str, named: str | None, offered: Sequence[str]) -> str | None:
    """The function the output's first call must be, under tool choice `mode` ("none",
    "auto", "required" or "function") with `named` the function a "function" choice
    names and `offered` every tool the model may call: the named one, or the one tool
    offered when a call is required; None when the model may answer in text or choose
    among several (`ToolCallParser.forced`)."""
    if mode == "function":
        return named
    if mode == "required" and len(offered) == 1:
        return offered[0]
    return None


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Feed text deltas; get text pieces and complete calls back, in order."""

    def __init__(
        self, allowed: Collection[str], max_calls: int | None = None, forced: str | None = None
    ) -> None:
        self.allowed = allowed
        self.max_calls = max_calls  # calls beyond it come back as text
        # The function the output's first call must be (`first_call_function`).
        self.forced = forced
        self.num_calls = 0
        self.dropped_cut_call = False  # `finish` dropped a call cut before its name
        self._buffer = ""
        self._offset = 0  # where the buffer starts in the text fed
        self._in_block = False
        self._streaming: _StreamingCall | None = None  # the open block, once it is a call

    def feed(self, delta: str) -> list[ToolEvent]:
        self._buffer += delta
        events: list[ToolEvent] = []
        while True:
            if self._in_block:
                end = self._block_end(self._buffer)
                if end < 0:
                    events += self._stream_block()
                    return events
                events += self._close_block(self._buffer[:end], True, self._offset - len(OPEN_TAG))
                self._consume(end + len(CLOSE_TAG))
                self._in_block = False
            else:
                start = self._buffer.find(OPEN_TAG)
                if start < 0:
                    keep = _partial_tag_suffix(self._buffer, OPEN_TAG)
                    cut = len(self._buffer) - keep
                    if cut:
                        events.append(TextPiece(self._buffer[:cut], self._offset))
                    self._consume(cut)
                    return events
                if start:
                    events.append(TextPiece(self._buffer[:start], self._offset))
                self._consume(start + len(OPEN_TAG))
                self._in_block = True

    def _consume(self, n: int) -> None:
        """Drop the buffer's first `n` characters, parsed."""
        self._buffer = self._buffer[n:]
        self._offset += n

    def finish(self, cut: bool = False) -> list[ToolEvent]:
        """Flush at the end of generation. An unclosed final block still counts as a call
        when its body parses: models often stop right before writing the closing tag.

        cut: the token budget ended the generation. A call it cut before its arguments
        began (a held-back `<tool_`, or a block that is not a call yet) is
        `_cut_before_its_arguments`: under the call grammar that text can only be the start
        of a call, and it is markup, not an answer. A call with arguments begun keeps what
        it has (incomplete)."""
        rest, start = self._buffer, self._offset
        self._consume(len(rest))
        if self._in_block:
            self._in_block = False
            unfinished = cut and self._streaming is None and not _CANONICAL_START.match(rest)
            if unfinished and parse_call(rest.strip(), self.allowed) is None:
                return self._cut_before_its_arguments(rest)
            return self._close_block(rest, False, start - len(OPEN_TAG))
        if cut:
            partial = _partial_tag_suffix(rest, OPEN_TAG)
            rest = rest[: len(rest) - partial]
            text = [TextPiece(rest, start)] if rest else []
            return text + (self._cut_before_its_arguments("") if partial else [])
        return [TextPiece(rest, start)] if rest else []

    def _cut_before_its_arguments(self, body: str) -> list[ToolEvent]:
        """A call the budget cut before its arguments began (`body`: its block so far):
        incomplete and with no arguments yet, the call of the function its text already
        names (an offered one), else of the forced function when it is the output's first
        call; else dropped, since which function it was is unknown."""
        named = _NAMED.match(body)
        if named and named.group(1) in self.allowed and self._room_for_a_call():
            name = named.group(1)
        elif self.forced is not None and self.num_calls == 0:
            name = self.forced
        else:
            self.dropped_cut_call = True
            return []
        self.num_calls += 1
        return [ParsedCall(name, "", complete=False)]

    def _block_end(self, body: str) -> int:
        """Where the open block's closing tag starts, -1 if it has not come. In a call
        written the canonical way the body is JSON, and the tag counts only outside its
        strings: an argument may hold the text `</tool_call>` (the grammar allows it)."""
        match = _CANONICAL_START.match(body)
        if not (match and match.group(1) in self.allowed):
            return body.find(CLOSE_TAG)
        for token in _STRING_OR_CLOSE.finditer(body, match.end()):
            if token.group() == CLOSE_TAG:
                return token.start()
        return -1

    def _room_for_a_call(self) -> bool:
        return self.max_calls is None or self.num_calls < self.max_calls

    def _stream_block(self) -> list[ToolEvent]:
        """In an open block: start a call once its canonical opening is complete, then
        send the arguments written so far, holding back from the last `}` on (it may be
        the end of the wrapping object) and any partial closing tag."""
        events = self._try_start(self._buffer)
        call = self._streaming
        if call is None:
            return events
        region = self._buffer[call.args_start :]
        safe = len(region) - _partial_tag_suffix(region, CLOSE_TAG)
        brace = region.rfind("}")
        if brace >= 0:
            safe = min(safe, brace)
        if safe > call.num_sent:
            events.append(ArgumentsDelta(region[call.num_sent : safe]))
            call.num_sent = safe
        return events

    def _try_start(self, body: str) -> list[ToolEvent]:
        """Make the open block a call if its canonical opening is complete."""
        if self._streaming is not None:
            return []
        match = _CANONICAL_START.match(body)
        if not (match and match.group(1) in self.allowed and self._room_for_a_call()):
            return []
        self.num_calls += 1
        self._streaming = _StreamingCall(match.group(1), match.end())
        return [CallStart(match.group(1))]

    def _close_block(self, body: str, closed: bool, start: int) -> list[ToolEvent]:
        """The open block as a call, or as the text it was (starting at `start`, its
        opening tag's place in the text fed)."""
        # A block the budget cut inside its closing tag ends where the tag began.
        call_body = body if closed else body[: len(body) - _partial_tag_suffix(body, CLOSE_TAG)]
        # However the text was split, a canonical opening makes the block a call.
        started = self._try_start(call_body)
        call, self._streaming = self._streaming, None
        if call is not None:
            return started + call.finish(call_body, self.allowed)
        parsed = parse_call(call_body.strip(), self.allowed)
        if parsed is not None and self._room_for_a_call():
            self.num_calls += 1
            return [parsed]
        return [TextPiece(OPEN_TAG + body + (CLOSE_TAG if closed else ""), start)]


@dataclass
class _StreamingCall:
    name: str
    args_start: int  # offset of the arguments in the block's body
    num_sent: int = 0  # characters of the arguments already sent

    def finish(self, body: str, allowed: Collection[str]) -> list[ToolEvent]:
        """The rest of the arguments and the whole call. A complete block drops the
        wrapping object's closing brace; a truncated one (the budget ran out) keeps all
        it has, which is what the stream has been sending."""
        region = body[self.args_start :]
        complete = parse_call(body.strip(), allowed) is not None
        if complete:
            region = region.rstrip().removesuffix("}").rstrip()
        events: list[ToolEvent] = []
        if len(region) > self.num_sent:
            events.append(ArgumentsDelta(region[self.num_sent :]))
        return [*events, ParsedCall(self.name, region, streamed=True, complete=complete)]


CallEvent = ParsedCall | CallStart | ArgumentsDelta


class ChoiceAssembler:
    """Turns one choice's text deltas into content pieces and tool calls, in order.

    Whitespace next to a tool call (the newlines models put around `<tool_call>`
    blocks) is dropped; any other whitespace is kept. To decide that independently of
    where delta boundaries fall, trailing whitespace is held back until the next piece
    shows what follows it, so streamed and whole-text results always agree.

    A complete call that repeats an earlier one of the choice (same function, equal
    arguments) ends the choice: it and whatever follows are dropped, and `repeated`
    tells the caller that it may stop the generation. A small model offered parallel
    calls writes the same call again and again (the default 135M model, forced to call
    `get_weather` for "the weather in Paris", writes it until its budget runs out), and
    running a call twice in one turn gives the same answer twice. So that a stream never
    sends a call it then drops, the pieces of every call after the first (`CallStart`,
    `ArgumentsDelta`) are held back until the call is whole.
    """

    def __init__(
        self, tool_names: list[str], max_calls: int | None, forced: str | None = None
    ) -> None:
        """forced: the function the output's first call must be (`ToolCallParser.forced`)."""
        self.parser = ToolCallParser(tool_names, max_calls, forced) if tool_names else None
        self.pending_space = ""
        self._space_start = 0  # where pending_space starts in the text pushed
        self.num_calls = 0
        self.cut_calls = 0  # calls whose arguments the choice's end cut short
        self.repeated = False  # a call repeated an earlier one: the choice has ended
        self._fed = 0  # characters pushed so far
        self._made: set[tuple[str, str]] = set()  # the complete calls, `_call_key`
        self._held: list[CallEvent] = []  # the streamed pieces of a call after the first

    def push(self, text: str, final: bool, cut: bool = False) -> list[Content | CallEvent]:
        """Content pieces (strings that know where they start in the text pushed) and call
        events; a call's `CallStart` and `ArgumentsDelta`s (if it streamed) come before
        its `ParsedCall`. `cut`: the budget ended the choice (`ToolCallParser.finish`)."""
        start, self._fed = self._fed, self._fed + len(text)
        if self.parser is None:
            return [Content(text, start)] if text else []
        if self.repeated:
            return []
        events = self.parser.feed(text) + (self.parser.finish(cut) if final else [])
        out: list[Content | CallEvent] = []
        for e in events:
            if isinstance(e, CallStart | ArgumentsDelta):
                self.pending_space = ""
                (self._held if self.num_calls else out).append(e)
                continue
            if isinstance(e, ParsedCall):
                self.pending_space = ""
                if not self._add_call(e):
                    return out
                out += [*self._held, e]
                self._held = []
                continue
            piece = self.pending_space + e.text
            start = e.start - len(self.pending_space)
            body = piece.rstrip()
            self.pending_space = piece[len(body) :]
            self._space_start = start + len(body)
            if body:
                out.append(Content(body, start))
        if final and self.pending_space and not self.num_calls:
            out.append(Content(self.pending_space, self._space_start))
        return out

    def _add_call(self, call: ParsedCall) -> bool:
        """Count a call; False (and `repeated`) for one that repeats an earlier call."""
        key = _call_key(call)
        if key is not None and key in self._made:
            self.repeated, self._held = True, []
            return False
        if key is not None:
            self._made.add(key)
        self.num_calls += 1
        self.cut_calls += not call.complete
        return True

    def push_delta(
        self, text: str, finish_reason: str | None, stop_reason: str | int | None = None
    ) -> list[Content | CallEvent]:
        """`push` for one engine delta: its finish reason says whether it is the choice's
        last, and with its stop reason whether that end cut it (`ends_cut`)."""
        return self.push(text, finish_reason is not None, ends_cut(finish_reason, stop_reason))

    @property
    def began_calls(self) -> bool:
        """The choice made calls, or began one the budget cut before its name: its
        message's empty content is then `null`, as OpenAI gives beside calls."""
        return self.num_calls > 0 or (self.parser is not None and self.parser.dropped_cut_call)

    @property
    def calls_complete(self) -> bool:
        """The choice made calls, and none was cut short: what "tool_calls" promises."""
        return self.num_calls > 0 and self.cut_calls == 0


def _call_key(call: ParsedCall) -> tuple[str, str] | None:
    """What makes two calls the same: the function and its arguments, their keys in any
    order and spaced any way (`true` and `1` stay apart); None for a call cut short,
    which repeats nothing. Arguments that are not one JSON value (a model's block with
    keys after them, outside the grammar) are compared as written."""
    if not call.complete:
        return None
    try:
        arguments = json.dumps(json.loads(call.arguments), sort_keys=True)
    except json.JSONDecodeError:
        arguments = call.arguments
    return call.name, arguments


def ends_cut(finish_reason: str | None, stop_reason: str | int | None) -> bool:
    """Whether a choice's end may fall inside a call: the token budget ("length") or a
    client's stop string (a stop token is the model's own end of turn)."""
    return finish_reason == "length" or isinstance(stop_reason, str)


def parse_tool_calls(
    text: str, allowed: Collection[str], max_calls: int | None = None
) -> tuple[str, list[ParsedCall]]:
    """Whole-text form: (the text outside valid calls, the calls)."""
    parser = ToolCallParser(allowed, max_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, TextPiece))
    return content, [e for e in events if isinstance(e, ParsedCall)]
