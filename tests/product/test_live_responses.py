"""The `openai` SDK's `responses` and `conversations` against `python -m engine.serve` with
the default model. One server for the module, without the embedder (nothing here embeds
or searches: loading it took part of the module's start-up); answers are kept short."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time

import httpx
import jsonschema
import openai
import pytest
from openai.types.conversations import Conversation
from openai.types.responses import Response

from orchestrator.tools.sql_query import DEMO_DATABASE
from tests.server.live_server import LiveServer, start_server

MODEL = "smollm2-135m-instruct"
# Long enough that block granularity (16 tokens) is a small part of the history.
INSTRUCTIONS = ("You are a geography tutor. Answer in one short sentence. " * 12).strip()


@pytest.fixture(scope="module")
def live():
    server = start_server(
        "--compile", "off", "--no-embeddings", "--tool-database", str(DEMO_DATABASE)
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, text: str | list, **kwargs) -> Response:
    kwargs.setdefault("max_output_tokens", 16)
    return client.responses.create(
        model=MODEL, input=text, temperature=0, instructions=INSTRUCTIONS, **kwargs
    )


def test_a_two_turn_conversation_is_served_from_the_prefix_cache(client):
    first = ask(client, "What is the capital of Japan?")
    assert "Tokyo" in first.output_text
    second = ask(client, "And the capital of France?", previous_response_id=first.id)
    history = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens > history
    assert second.usage.input_tokens_details.cached_tokens >= 0.9 * history
    assert Response.model_validate(second.model_dump()).previous_response_id == first.id
    # A branch from the first turn is served from the same cached history.
    branch = ask(client, "And of Italy?", previous_response_id=first.id)
    assert branch.usage.input_tokens_details.cached_tokens >= 0.9 * history


def test_streamed_deltas_add_up_to_the_stored_text(client):
    events = list(
        client.responses.create(
            model=MODEL,
            input="Name three colors.",
            temperature=0,
            max_output_tokens=12,
            stream=True,
        )
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type in (
        "response.completed",
        "response.incomplete",
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and text == final.output_text
    assert client.responses.retrieve(final.id).output_text == text
    assert final.usage.output_tokens <= 12


def test_conversation_and_item_endpoints(client):
    conv = client.conversations.create(
        metadata={"user": "test"},
        items=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
        ],
    )
    reply = client.responses.create(
        model=MODEL,
        conversation=conv.id,
        temperature=0,
        input="What is my name?",
        max_output_tokens=12,
    )
    assert reply.status in ("completed", "incomplete") and reply.output_text
    items = list(client.conversations.items.list(conv.id, order="asc", limit=2))
    assert [i.role for i in items] == ["user", "assistant", "user", "assistant"]
    assert items[-1].content[0].text == reply.output_text
    added = client.conversations.items.create(
        conv.id, items=[{"role": "user", "content": "I live in Rome."}]
    )
    item = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert item.content[0].text == "I live in Rome."
    client.conversations.items.delete(item.id, conversation_id=conv.id)
    inputs = client.responses.input_items.list(reply.id)
    assert [i.content[0].text for i in inputs] == ["What is my name?"]
    updated = client.conversations.update(conv.id, metadata={"user": "ada"})
    assert Conversation.model_validate(updated.model_dump()).metadata == {"user": "ada"}
    client.conversations.items.delete(items[0].id, conversation_id=conv.id)
    assert len(list(client.conversations.items.list(conv.id))) == 3
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(reply.id)  # it has finished
    client.responses.delete(reply.id)
    assert client.conversations.delete(conv.id).deleted
    for call in (
        lambda: client.responses.retrieve(reply.id),
        lambda: client.conversations.retrieve(conv.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert info.value.param == "tools[0].type"


def test_a_users_files_are_read_into_the_prompt_and_counted(client):
    """An uploaded file (file_id) and an inline one (file_data) reach the model as their
    text: the prompt grows by at least their tokens, and they read back as given."""
    fact = "The meeting with the Lisbon office is on Thursday at 3 pm in room 12. " * 8
    uploaded = client.files.create(
        file=("meeting.txt", fact.encode(), "text/plain"), purpose="user_data"
    )
    inline = "data:text/markdown;base64," + base64.b64encode(fact.encode()).decode()
    question = {"type": "input_text", "text": "When is the meeting?"}
    files = [
        {"type": "input_file", "file_id": uploaded.id},
        {"type": "input_file", "filename": "notes.md", "file_data": inline},
    ]
    bare = ask(client, [{"role": "user", "content": [question]}], max_output_tokens=4)
    read = ask(client, [{"role": "user", "content": [question, *files]}], max_output_tokens=4)
    fact_tokens = len(fact) // 8  # English text takes more than 8 characters a token rarely
    assert read.usage.input_tokens >= bare.usage.input_tokens + 2 * fact_tokens
    (item,) = client.responses.input_items.list(read.id).data
    assert [(p.type, p.file_id, p.filename) for p in item.content[1:]] == [
        ("input_file", uploaded.id, "meeting.txt"),
        ("input_file", None, "notes.md"),
    ]
    assert item.content[2].file_data is None
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, [{"role": "user", "content": [{"type": "input_file", "file_id": "file-x"}]}])
    assert missing.value.param == "input[0].content[0].file_id"


def test_an_item_reference_brings_back_an_earlier_answer(client):
    """An item_reference to an earlier response's output reads as that answer: the turn
    that names it costs as many input tokens as the one that gives it back in full."""
    first = ask(client, "What is the capital of Japan?")
    answer = first.output[0]
    follow_up = {"role": "user", "content": "Say it again."}
    given = ask(client, [answer.model_dump(exclude_none=True), follow_up])
    referenced = ask(client, [{"type": "item_reference", "id": answer.id}, follow_up])
    assert referenced.usage.input_tokens == given.usage.input_tokens
    (item, _) = client.responses.input_items.list(referenced.id, order="asc").data
    assert item.id != answer.id and item.content[0].text == first.output_text
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, [{"type": "item_reference", "id": "msg_nope"}])
    assert missing.value.param == "input[0].id"


def test_a_dropped_stream_is_stored_incomplete_with_its_text(live, client):
    with httpx.stream(
        "POST",
        f"{live.url}/v1/responses",
        timeout=60,
        json={
            "model": MODEL,
            "input": "Count from one to one hundred in words.",
            "stream": True,
            "max_output_tokens": 400,
        },
    ) as stream:
        response_id, deltas = None, ""
        for line in stream.iter_lines():
            if line.startswith("data: "):
                payload = json.loads(line[6:])
                response_id = response_id or payload.get("response", {}).get("id")
                deltas += payload.get("delta", "") if payload["type"].endswith("delta") else ""
                if len(deltas) > 10:
                    break
    deadline = time.monotonic() + 60
    while (stored := client.responses.retrieve(response_id)).status == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stored.status == "incomplete"
    assert stored.output_text.startswith(deltas)
    assert stored.usage.output_tokens < 400


def test_cancel_stops_a_background_response_being_generated(client):
    stream = client.responses.create(
        model=MODEL,
        input="Count from one to one hundred.",
        max_output_tokens=400,
        stream=True,
        background=True,
    )
    events = iter(stream)
    response_id = next(events).response.id
    for event in events:
        if event.type == "response.output_text.delta":
            break
    cancelled = client.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    rest = list(events)
    assert rest[-1].type == "response.incomplete" and rest[-1].response.status == "cancelled"
    assert client.responses.retrieve(response_id).output_text == cancelled.output_text
    assert cancelled.usage.output_tokens < 400


PLACE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "country", "rank"],
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "enum": ["Japan", "France", "Peru"]},
        "rank": {"type": "integer", "minimum": 1, "maximum": 10},
    },
}


def test_json_schema_output_always_validates(client):
    for i, question in enumerate(
        ["Name a city in Japan.", "Tell me about Paris.", "Where is Lima?", "Pick any city."]
    ):
        response = client.responses.create(
            model=MODEL,
            input=question,
            max_output_tokens=64,
            temperature=0.8 * (i % 2),
            text={
                "format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}
            },
        )
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), PLACE)
        assert response.text.format.type == "json_schema"


def test_output_text_logprobs_are_the_answers_tokens(client):
    """With the include, a structured answer's logprobs are its tokens: their bytes join
    to its text exactly (a character split across tokens included), the deltas' add up
    to the done event's, each with the two likeliest tokens there."""
    events = list(
        client.responses.create(
            model=MODEL,
            input="Tell me about Paris.",
            max_output_tokens=48,
            temperature=0,
            include=["message.output_text.logprobs"],
            top_logprobs=2,
            stream=True,
            text={"format": {"type": "json_schema", "name": "place", "schema": PLACE}},
        )
    )
    final = events[-1].response
    part = final.output[0].content[0]
    assert b"".join(bytes(lp.bytes) for lp in part.logprobs).decode() == part.text
    assert len(part.logprobs) <= final.usage.output_tokens and final.top_logprobs == 2
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in part.logprobs)
    streamed = [
        (lp.token, lp.logprob)
        for e in events
        if e.type == "response.output_text.delta"
        for lp in e.logprobs
    ]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert streamed == [(lp.token, lp.logprob) for lp in done.logprobs]
    assert streamed == [(lp.token, lp.logprob) for lp in part.logprobs]


def test_a_forced_tool_call_has_valid_arguments(client):
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city"],
            "properties": {"city": {"type": "string", "maxLength": 24}},
        },
    }
    response = ask(
        client,
        "What is the weather in Paris?",
        max_output_tokens=64,
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert response.status == "completed"
    [call] = response.output
    assert (call.type, call.name) == ("function_call", "get_weather")
    jsonschema.validate(json.loads(call.arguments), weather["parameters"])


def mentions(text: str, value: float) -> bool:
    """Whether `text` writes the number `value` (58388, 58,388.0 and $58388.00 alike)."""
    numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", text)
    return any(abs(float(n.replace(",", "")) - value) < 0.005 for n in numbers)


@pytest.mark.parametrize(
    "question",
    ["What were our East China sales last quarter?", "What were East China sales in 2026-Q3?"],
)
def test_sql_query_answers_the_sales_question_inside_a_response(client, question):
    """The forced call is decoded under the database's SQL grammar, and the description
    lists the columns, the values (periods latest first) and an example: the default
    model sums the revenue of the asked region and quarter ("last quarter": the latest,
    2026-Q3), the result comes back framed as data, and the model answers after it. What
    the answer says is not asserted: on the eager path the wording changes with the CPU's
    rounding (on an Intel Xeon it carried the total, on an AMD EPYC it did not; see
    docs/tools.md)."""
    response = client.responses.create(
        model=MODEL,
        input=question,
        temperature=0,
        tools=[{"type": "function", "name": "sql_query"}],
        parallel_tool_calls=False,
        tool_choice={"type": "function", "name": "sql_query"},
        max_output_tokens=200,
    )
    kinds = [item.type for item in response.output]
    assert kinds[:2] == ["function_call", "function_call_output"]
    call, result = response.output[:2]
    sql = json.loads(call.arguments)["sql"]
    assert call.name == "sql_query" and result.call_id == call.call_id
    assert "'East China'" in sql and "'2026-Q3'" in sql, sql
    with sqlite3.connect(DEMO_DATABASE) as db:
        ((total,),) = db.execute(
            "SELECT SUM(revenue_usd) FROM sales WHERE region = ? AND quarter = ?",
            ("East China", "2026-Q3"),
        ).fetchall()
        # What the model's own query returns is that total.
        assert db.execute(sql).fetchall() == [(total,)], sql
    assert mentions(result.output, total)
    assert kinds[2:] == ["message"]  # the model answered after reading the result
    assert response.output_text.strip() and not response.output_text.lstrip().startswith("<")
    stored = client.responses.retrieve(response.id)
    assert stored.output == response.output
