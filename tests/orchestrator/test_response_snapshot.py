"""GET /v1/responses/{id} of a running response: the copy of the live response object
it returns (`orchestrator.events.snapshot`), which later events must leave as it is and
which must not copy the answer's token logprobs on every poll."""

from __future__ import annotations

import asyncio
import collections
import copy
import json
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response

from orchestrator.events import ResponseEvents, hide_logprobs
from orchestrator.response_request import ResponseRequest
from orchestrator.responses import ResponseService
from orchestrator.tool_parser import ParsedCall
from orchestrator.turn import RESPONSE_DEFAULTS, new_response
from tests.server.fake_engine import FakeEngine

OWNER = "user_local"
LOGPROBS = "message.output_text.logprobs"
copies: collections.Counter[str] = collections.Counter()


class CountedEntry(dict):
    """A token's logprob entry that counts the deep copies made of it."""

    def __deepcopy__(self, memo: dict) -> dict:
        copies["entry"] += 1
        return CountedEntry(copy.deepcopy(dict(self), memo))


def _entry(i: int, top: int) -> CountedEntry:
    def named(t: int) -> dict:
        return {"token": chr(97 + t % 26), "logprob": -0.25 * t, "bytes": [97 + t % 26]}

    return CountedEntry(named(i), top_logprobs=[named(i + k) for k in range(top)])


def _running(events: ResponseEvents) -> ResponseService:
    """A service whose one running turn (of OWNER, stored) has `events`."""
    service = ResponseService(FakeEngine(), store=None, lock=None, inputs=None)
    turn = SimpleNamespace(owner=OWNER, request=SimpleNamespace(store=True), events=events)
    service.running[events.response["id"]] = turn
    return service


def _live_events() -> ResponseEvents:
    events = ResponseEvents(new_response(ResponseRequest(model="m", input=[]), "in_progress"))
    events.start()
    return events


def _retrieve(service: ResponseService, response_id: str, include: tuple[str, ...]) -> dict:
    return asyncio.run(service.retrieve(OWNER, response_id, include))


def _as_before(response: dict, include: tuple[str, ...]) -> dict:
    """What a retrieve of the running response gave before it stopped deep-copying."""
    body = copy.deepcopy(response)
    if LOGPROBS not in include:
        hide_logprobs(body["output"])
    return {**RESPONSE_DEFAULTS, **body}


def test_polling_a_long_running_answer_does_not_copy_its_logprobs():
    """A running answer of thousands of tokens with top_logprobs: each GET used to deep
    copy every entry (seconds of event loop per poll); it now copies none of them, with
    the include or without, and still shows them all when asked."""
    events = _live_events()
    for i in range(2000):
        events.text("a", [_entry(i, top=20)])
    service = _running(events)
    response_id = events.response["id"]
    copies.clear()
    hidden = _retrieve(service, response_id, ())
    shown = _retrieve(service, response_id, (LOGPROBS,))
    assert copies["entry"] == 0
    assert Response.model_validate(hidden).output[0].content[0].logprobs == []
    part = Response.model_validate(shown).output[0].content[0]
    assert len(part.logprobs) == 2000 and len(part.logprobs[-1].top_logprobs) == 20


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(max_size=5), st.integers(0, 3)),
        st.tuples(st.just("call"), st.sampled_from(["f", "g"]), st.booleans()),
        st.tuples(st.just("close")),
    ),
    max_size=8,
)


def _apply(events: ResponseEvents, ops: list[tuple]) -> None:
    for op in ops:
        if op[0] == "text":
            events.text(op[1], [_entry(i, top=2) for i in range(op[2])])
        elif op[0] == "call":
            events.function_call(ParsedCall(op[1], '{"x": 1}', complete=op[2]))
        else:
            events.close_message()


@settings(max_examples=150, deadline=None)
@given(before=_OPS, after=_OPS, include=st.sampled_from([(), (LOGPROBS,)]))
def test_a_retrieved_running_response_is_as_before_and_stays_as_it_was(before, after, include):
    """At any point of a turn, GET gives the body it gave when it deep-copied the live
    response (same JSON, key order included, an OpenAI SDK Response), and the events
    that come after leave that body as it was."""
    events = _live_events()
    _apply(events, before)
    service = _running(events)
    expected = json.dumps(_as_before(events.response, include))
    body = _retrieve(service, events.response["id"], include)
    assert json.dumps(body) == expected
    Response.model_validate(body)
    _apply(events, after)
    events.finish("completed", None, completed_at=1)
    assert json.dumps(body) == expected
