"""Server-side tools in /v1/responses: the model -> tool -> model loop, on the app with a
scripted engine (its reply depends on the prompt it is given) and a real store."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from engine.serve import build_parser, tool_registry
from orchestrator.accounts.identity import LOCAL
from orchestrator.output_structure import protocol_text
from orchestrator.sandbox import Sandbox
from orchestrator.tools import ToolRegistry
from orchestrator.tools.calculator import Calculator
from orchestrator.tools.sql_query import DEMO_DATABASE
from tests.product.conftest import ProductServer
from tests.server.fake_engine import FakeEngine
from tests.server.sse_client import events

MODEL = "fake-model"
CALCULATOR = {"type": "function", "name": "calculator"}
SQL = {"type": "function", "name": "sql_query"}
EAST_Q3 = "SELECT SUM(revenue_usd) FROM sales WHERE region = 'East China' AND quarter = '2026-Q3'"


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _tool_results(prompt: str) -> list[str]:
    """The spotlighted tool outputs in a prompt, oldest first (without the frame)."""
    return re.findall(
        r'<untrusted origin="tool \w+" id="\w+">\n\(Data from [^)]*\)\n'
        r"(.*?)\n</untrusted",
        prompt,
        re.DOTALL,
    )


def _scripted(*calls: str, answer: str = "Result: {}"):
    """A model that makes `calls` (one generation each, while tools are offered), then
    answers with the last tool output it was given."""

    def reply(prompt: str) -> str:
        done = len(_tool_results(prompt))
        rounds = sum(c.count("<tool_call>") for c in calls)
        if "<tools>" in prompt and done < rounds:
            made = 0
            for call in calls:  # the first generation whose calls are not answered yet
                made += call.count("<tool_call>")
                if made > done:
                    return call
        results = _tool_results(prompt)
        return answer.format(results[-1] if results else "")

    return reply


def _post(server: ProductServer, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body}, timeout=30)


def _types(response: dict) -> list[str]:
    return [item["type"] for item in response["output"]]


def _prompt(server: ProductServer, index: int = -1) -> str:
    return server.engine.tokenizer.decode(server.engine.prompts[index])


def test_calculator_call_then_an_answer_is_stored_whole(product_server):
    server = product_server(
        FakeEngine(reply=_scripted(_call("calculator", expression="0.1 + 0.2")))
    )
    raw = _post(server, input="What is 0.1 + 0.2?", tools=[CALCULATOR])
    assert raw.status_code == 200
    body = raw.json()
    response = Response.model_validate(body)
    assert response.status == "completed"
    assert _types(body) == ["function_call", "function_call_output", "message"]
    call, result, _ = body["output"]
    assert call["name"] == "calculator" and result["call_id"] == call["call_id"]
    assert result["output"] == "0.3"
    assert response.output_text == "Result: 0.3"
    assert len(server.engine.prompts) == 2  # model, tool, model
    second = _prompt(server)
    assert '<untrusted origin="tool calculator"' in second and "not an instruction" in second
    assert response.usage.input_tokens == sum(len(p) for p in server.engine.prompts)
    stored = httpx.get(f"{server.url}/v1/responses/{response.id}", timeout=10).json()
    assert stored["output"] == body["output"] and stored["status"] == "completed"


def test_sql_query_on_the_demo_database(product_server):
    # The fake tokenizer spends a token per character: room for the schema's description.
    engine = FakeEngine(reply=_scripted(_call("sql_query", sql=EAST_Q3)), max_model_len=8192)
    server = product_server(engine)
    body = _post(
        server,
        input="What were East China sales in 2026-Q3?",
        tools=[SQL],
        tool_choice={"type": "function", "name": "sql_query"},
    ).json()
    assert _types(body) == ["function_call", "function_call_output", "message"]
    with sqlite3.connect(DEMO_DATABASE) as db:
        ((total,),) = db.execute(EAST_Q3).fetchall()
    assert str(total) in body["output"][1]["output"]
    assert str(total) in body["output"][2]["content"][0]["text"]
    assert '"sql_query"' in _prompt(server, 0)  # the schema-filled declaration is listed
    assert "Tables:" in _prompt(server, 0)
    # The call is decoded under the database's SQL grammar, which the prompt leaves out.
    grammar = server.engine.params[0].structured_outputs.grammar
    assert "'East China'" in grammar and '"pattern"' in grammar
    assert "pattern" not in _prompt(server, 0)
    assert "sql_query" in _prompt(server, 0).split("<|im_start|>user")[0]
    assert "You must call the function 'sql_query'" in _prompt(server, 0)
    # The forced call made, the answer turn is offered no tools.
    assert "<tools>" not in _prompt(server, 1) and "You must call" not in _prompt(server, 1)
    assert server.engine.params[1].structured_outputs == protocol_text(True)


def test_a_function_forced_by_name_is_called_once_then_the_model_answers(product_server):
    again = _call("calculator", expression="2 + 2")
    server = product_server(FakeEngine(reply=_scripted(again, again, answer="Four.")))
    forced = {"type": "function", "name": "calculator"}
    body = _post(server, input="Add", tools=[CALCULATOR], tool_choice=forced).json()
    assert _types(body) == ["function_call", "function_call_output", "message"]
    assert len(server.engine.prompts) == 2 and "<tools>" not in _prompt(server)
    # "required" forces a first call only: the model may call again after it.
    server = product_server(FakeEngine(reply=_scripted(again, again, answer="Four.")))
    body = _post(server, input="Add", tools=[CALCULATOR], tool_choice="required").json()
    assert _types(body) == ["function_call", "function_call_output"] * 2 + ["message"]
    assert "<tools>" in _prompt(server, 1)


def test_the_answer_turn_repeats_the_question_after_the_results(product_server):
    server = product_server(FakeEngine(reply=_scripted(_call("calculator", expression="6 * 7"))))
    question = "What is six times seven?"
    forced = {"type": "function", "name": "calculator"}
    body = _post(server, input=question, tools=[CALCULATOR], tool_choice=forced).json()
    answer_prompt = _prompt(server, 1)
    after_results = answer_prompt.split("</tool_response>")[-1]
    assert f"Question: {question}\nAnswer the question in one short sentence" in after_results
    # It shares the results' user turn, and only the prompt shows it.
    assert after_results.index("Question:") < after_results.index("<|im_end|>")
    assert "<|im_start|>user" not in after_results
    assert "Question:" not in json.dumps(body["output"])
    url = f"{server.url}/v1/responses/{body['id']}/input_items"
    stored = httpx.get(url, timeout=10).json()["data"]
    assert stored and "Question:" not in json.dumps(stored)


def test_a_turn_offered_tools_after_results_is_not_an_answer_turn(product_server):
    server = product_server(FakeEngine(reply=_scripted(_call("calculator", expression="6 * 7"))))
    _post(server, input="What is six times seven?", tools=[CALCULATOR])
    assert "<tools>" in _prompt(server, 1) and "Question:" not in _prompt(server, 1)
    assert server.engine.params[1].structured_outputs.regex is None


def test_parallel_calls_run_and_answer_in_call_order(product_server):
    both = _call("calculator", expression="6 * 7") + _call("calculator", expression="1 / 8")
    server = product_server(FakeEngine(reply=_scripted(both)))
    body = _post(server, input="Two sums", tools=[CALCULATOR]).json()
    assert _types(body) == [
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    first, second, out1, out2, _ = body["output"]
    assert (out1["call_id"], out1["output"]) == (first["call_id"], "42")
    assert (out2["call_id"], out2["output"]) == (second["call_id"], "0.125")
    assert len(server.engine.prompts) == 2


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_a_call_repeating_an_earlier_one_ends_the_turn(product_server):
    """Forced to call its one function for "the weather in Paris", the default 135M model
    wrote the same call until max_output_tokens cut the response (incomplete, with the
    same function_call several times). A call that repeats one of its turn's earlier
    calls ends the turn there: the response has each call once and completes, and the
    engine stops generating. A built-in's repeat does not run again."""
    paris = _call("get_weather", city="Paris")
    rome = _call("get_weather", city="Rome")
    reply = "\n".join([paris, rome, paris, paris, rome, "Done."])
    server = product_server(FakeEngine(reply=reply))
    for stream in (False, True):
        raw = _post(
            server, input="Weather?", tools=[WEATHER], tool_choice="required", stream=stream
        )
        sent = list(events(raw)) if stream else []
        body = sent[-1]["response"] if stream else raw.json()
        assert body["status"] == "completed", body
        calls = [(i["type"], json.loads(i["arguments"])) for i in body["output"]]
        assert calls == [("function_call", {"city": "Paris"}), ("function_call", {"city": "Rome"})]
        assert body["usage"]["output_tokens"] == len("\n".join([paris, rome, paris]))
        assert server.engine.aborted[-1] == body["id"]
        added = [e["item"] for e in sent if e["type"] == "response.output_item.added"]
        assert [i["type"] for i in added] == (["function_call"] * 2 if stream else [])
        Response.model_validate(body)
    sum_ = _call("calculator", expression="1 + 2")

    def reply(prompt: str) -> str:
        results = _tool_results(prompt)
        return f"It is {results[-1]}." if results else f"{sum_}\n{sum_}"

    server = product_server(FakeEngine(reply=reply))
    body = _post(server, input="1 + 2?", tools=[CALCULATOR], tool_choice="required").json()
    assert _types(body) == ["function_call", "function_call_output", "message"]
    assert body["output"][-1]["content"][0]["text"] == "It is 3."


@pytest.mark.parametrize("stream", [False, True])
def test_max_tool_calls_refuses_the_rest_and_asks_for_an_answer(product_server, stream):
    greedy = _call("calculator", expression="1 + 1") + _call("calculator", expression="2 + 2")
    server = product_server(FakeEngine(reply=_scripted(greedy, greedy, answer="Done.")))
    raw = _post(server, input="Add", tools=[CALCULATOR], max_tool_calls=1, stream=stream)
    body = list(events(raw))[-1]["response"] if stream else raw.json()
    assert body["max_tool_calls"] == 1 and body["status"] == "completed"
    assert _types(body) == [
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    assert body["output"][2]["output"] == "2"
    assert "max_tool_calls" in body["output"][3]["output"]
    assert len(server.engine.prompts) == 2
    assert "<tools>" not in _prompt(server)  # the last turn had no tools to call
    assert "Question: Add\n" in _prompt(server)
    assert server.engine.params[1].structured_outputs == protocol_text(True)


def test_a_tool_error_goes_back_to_the_model(product_server):
    server = product_server(
        FakeEngine(
            reply=_scripted(_call("calculator", expression="__import__('os')"), answer="Sorry: {}")
        )
    )
    body = _post(server, input="Break it", tools=[CALCULATOR]).json()
    assert body["status"] == "completed"
    error = body["output"][1]["output"]
    assert error.startswith("Error:")
    assert body["output"][2]["content"][0]["text"] == f"Sorry: {error}"


def test_streamed_events_are_openai_events_and_match_the_stored_response(product_server):
    server = product_server(
        FakeEngine(
            reply=_scripted(
                _call("calculator", expression="2 ** 10"), _call("calculator", expression="3 * 3")
            )
        )
    )
    adapter = TypeAdapter(ResponseStreamEvent)
    with httpx.stream(
        "POST",
        f"{server.url}/v1/responses",
        timeout=30,
        json={"model": MODEL, "input": "Powers", "tools": [CALCULATOR], "stream": True},
    ) as s:
        lines = [line for line in s.iter_lines() if line]
    events = [adapter.validate_json(line[len("data: ") :]) for line in lines[1::2]]
    assert [line[len("event: ") :] for line in lines[::2]] == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed"
    assert [i.type for i in final.output] == [
        "function_call",
        "function_call_output",
        "function_call",
        "function_call_output",
        "message",
    ]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [
        (i, item.type) for i, item in enumerate(final.output)
    ]
    stored = server.client.responses.retrieve(final.id)
    assert stored.output == final.output
    assert final.output[3].output == "9"


def test_code_interpreter_runs_in_the_sandbox(product_server, monkeypatch):
    code = _call("code_interpreter", code="print(6 * 7)")
    server = product_server(FakeEngine(reply=_scripted(code)))
    sandboxed = {"type": "code_interpreter", "container": {"type": "auto"}}
    owners = []  # whose turn each run waited for among the sandbox's slots
    run = Sandbox.run

    async def recorded(self, code, limits=None, label=None, owner=""):
        owners.append(owner)
        return await run(self, code, limits, label, owner)

    monkeypatch.setattr(Sandbox, "run", recorded)
    body = _post(server, input="Compute", tools=[sandboxed]).json()
    assert owners == [LOCAL.owner]
    assert _types(body) == ["code_interpreter_call", "message"]
    item = body["output"][0]
    assert item["status"] == "completed" and item["code"] == "print(6 * 7)"
    assert item["outputs"][0]["logs"].strip() == "42"
    assert body["output"][1]["content"][0]["text"].startswith("Result: 42")
    assert '<untrusted origin="tool code_interpreter"' in _prompt(server)
    Response.model_validate(body)
    # OpenAI's include for the outputs is taken (they are there either way), on POST and GET.
    include = ["code_interpreter_call.outputs"]
    raw = _post(server, input="Compute", tools=[sandboxed], include=include)
    assert raw.status_code == 200, raw.json()
    assert raw.json()["output"][0]["outputs"][0]["logs"].strip() == "42"
    url = f"{server.url}/v1/responses/{raw.json()['id']}"
    stored = httpx.get(url, params={"include[]": include}, timeout=10)
    assert stored.status_code == 200 and stored.json()["output"] == raw.json()["output"]


def test_a_clients_own_history_may_give_back_builtin_call_items(product_server):
    """A client that keeps the state itself sends the output it got back as input
    (`input=[*earlier, *response.output, next]`): code_interpreter_call and
    file_search_call items are shown as the calls and results they were."""
    code = _call("code_interpreter", code="print(6 * 7)")
    server = product_server(FakeEngine(reply=_scripted(code)))
    sandboxed = {"type": "code_interpreter", "container": {"type": "auto"}}
    first = _post(server, input="Compute", tools=[sandboxed], store=False).json()
    searched = {
        "id": "fs_1",
        "type": "file_search_call",
        "status": "completed",
        "queries": ["zebra food"],
        "results": [{"file_id": "file_1", "filename": "zoo.txt", "score": 0.9, "text": "Hay."}],
    }
    again = [*first["output"], searched, {"role": "user", "content": "And doubled?"}]
    raw = _post(server, input=[{"role": "user", "content": "Compute"}, *again], store=False)
    assert raw.status_code == 200, raw.json()
    prompt = _prompt(server)
    assert '"code": "print(6 * 7)"' in prompt and _tool_results(prompt)[0] == "42"
    assert '<untrusted origin="file zoo.txt"' in prompt and "Hay." in prompt
    # Stored, they keep their outputs and status, under ids of their own.
    failed = {**first["output"][0], "status": "failed"}
    body = _post(server, input=[failed, {"role": "user", "content": "Again?"}]).json()
    url = f"{server.url}/v1/responses/{body['id']}/input_items?order=asc"
    item = httpx.get(url, timeout=10).json()["data"][0]
    assert item["status"] == "failed" and item["outputs"] == failed["outputs"]
    assert item["id"].startswith("ci_") and item["id"] != failed["id"]
    for bad, param in (
        ({**failed, "outputs": [{"type": "files"}]}, "input[0].outputs[0].type"),
        ({**failed, "status": "done"}, "input[0].status"),
        ({**searched, "queries": [1]}, "input[0].queries[0]"),
        ({**searched, "queries": None}, "input[0].queries"),
        (
            {"type": "code_interpreter_call", "container_id": "c", "status": "completed"},
            "input[0].id",
        ),
        ({**searched, "results": [{"score": 1}]}, "input[0].results[0].text"),
    ):
        raw = _post(server, input=[bad, {"role": "user", "content": "x"}])
        assert raw.status_code == 400 and raw.json()["error"]["param"] == param, raw.json()


def test_code_interpreter_forced_by_its_type_runs_once_then_the_model_answers(product_server):
    code = _call("code_interpreter", code="print(6 * 7)")
    server = product_server(FakeEngine(reply=_scripted(code, code)))
    sandboxed = {"type": "code_interpreter", "container": {"type": "auto"}}
    forced = {"type": "code_interpreter"}
    body = _post(server, input="Compute", tools=[sandboxed], tool_choice=forced).json()
    assert _types(body) == ["code_interpreter_call", "message"], body
    assert body["output"][0]["outputs"][0]["logs"].strip() == "42"
    assert "You must call the function 'code_interpreter'" in _prompt(server, 0)
    assert len(server.engine.prompts) == 2 and "<tools>" not in _prompt(server)
    assert Response.model_validate(body).tool_choice.type == "code_interpreter"
    raw = _post(server, input="Compute", tools=[CALCULATOR], tool_choice=forced)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "tool_choice"
    # cut before its name was written, the forced call is still shown, not run
    cut = _post(server, input="Compute", tools=[sandboxed], tool_choice=forced, max_output_tokens=8)
    items = [(i["type"], i["status"], i["code"]) for i in cut.json()["output"]]
    assert items == [("code_interpreter_call", "incomplete", "")]


def test_code_calls_cut_by_max_output_tokens_stay_in_the_response_unrun(product_server):
    """The budget ran out while the model wrote a second call: both calls are items, not
    run, as the response ended there (the cut one with the code it had written)."""
    first = _call("code_interpreter", code="print(6 * 7)")
    second = _call("code_interpreter", code="print(7 * 8)")
    server = product_server(FakeEngine(reply=_scripted(first + "\n" + second)))
    cut = len(first) + 1 + second.index("7 * 8")
    tools = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    for stream in (False, True):
        raw = _post(server, input="Compute", tools=tools, max_output_tokens=cut, stream=stream)
        if stream:
            sent = list(events(raw))
            body = sent[-1]["response"]
            added = [e["item"]["code"] for e in sent if e["type"] == "response.output_item.added"]
            assert added == ["print(6 * 7)", "print("]
        else:
            body = raw.json()
        assert body["status"] == "incomplete"
        items = [(i["type"], i["status"], i["code"]) for i in body["output"]]
        assert items == [
            ("code_interpreter_call", "incomplete", "print(6 * 7)"),
            ("code_interpreter_call", "incomplete", "print("),
        ]
        logs = body["output"][0]["outputs"][0]["logs"]
        assert logs == "Error: not run: this response reached max_output_tokens."


def test_a_builtin_function_call_cut_off_by_the_budget_says_it_did_not_run(product_server):
    """The calculator call was complete, then the budget ran out (in the next call): the
    call gets an output saying it did not run, instead of a bare call with none."""
    first = _call("calculator", expression="1 + 2")
    second = _call("calculator", expression="3 + 4")
    server = product_server(FakeEngine(reply=_scripted(first + "\n" + second)))
    cut = len(first) + 1 + second.index("3 + 4")
    body = _post(server, input="Add", tools=[CALCULATOR], max_output_tokens=cut).json()
    assert body["status"] == "incomplete"
    complete, cut_call, output = body["output"]
    assert (complete["type"], complete["status"]) == ("function_call", "completed")
    assert (cut_call["type"], cut_call["status"]) == ("function_call", "incomplete")
    assert (output["type"], output["call_id"]) == ("function_call_output", complete["call_id"])
    assert output["output"] == "Error: not run: this response reached max_output_tokens."
    Response.model_validate(body)


def test_a_lone_surrogate_in_a_calls_arguments_is_no_server_error(product_server):
    """JSON's `\\ud800` escape (which the call grammar allows) decodes to no text: a
    code item, a search's queries or a tool's error output holding it cannot be sent as
    UTF-8, which made the response a 500 and cut its stream."""
    calls = [
        _call("code_interpreter", code="print(1)  # \ud800"),
        _call("calculator", expression="1 + \ud800"),
    ]
    tools = [{"type": "code_interpreter", "container": {"type": "auto"}}, CALCULATOR]
    for call in calls:  # both tools' declarations and a call's output: past 2,048 tokens
        server = product_server(FakeEngine(reply=_scripted(call), max_model_len=4096))
        for stream in (False, True):
            raw = _post(server, input="Go", tools=tools, stream=stream)
            assert raw.status_code == 200, raw.text
            if stream:
                assert list(events(raw))[-1]["type"] == "response.completed"
            else:
                Response.model_validate(raw.json())


def test_arguments_nested_past_the_json_decoders_depth_are_no_server_error(product_server):
    """json.loads raises RecursionError on JSON nested a few thousand deep: a model's call
    holding it left the response in_progress for good (its stream ended in an error
    event), and a client's history holding it was a 500."""
    deep = "[" * 1500 + "]" * 1500
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": ' + deep + "}}"
    engine = FakeEngine(reply=_scripted(call + "\n</tool_call>"), max_model_len=32768)
    server = product_server(engine)
    for stream in (False, True):
        raw = _post(server, input="Go", tools=[CALCULATOR], stream=stream)
        assert raw.status_code == 200, raw.text
        body = list(events(raw))[-1]["response"] if stream else raw.json()
        assert body["status"] == "completed", body
        assert body["output"][1]["output"] == "Error: the arguments are nested too deeply"
    history = [
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": deep},
        {"type": "function_call_output", "call_id": "call_1", "output": "done"},
    ]
    raw = _post(server, input=history)
    assert raw.status_code == 200, raw.text
    Response.model_validate(raw.json())


def test_a_client_function_still_ends_the_response(product_server):
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    calls = _call("calculator", expression="1 + 2") + _call("get_weather", city="Oslo")
    server = product_server(FakeEngine(reply=_scripted(calls)))
    body = _post(server, input="Both", tools=[CALCULATOR, weather]).json()
    assert _types(body) == ["function_call", "function_call", "function_call_output"]
    assert body["output"][2]["output"] == "3"
    assert len(server.engine.prompts) == 1


def test_default_tools_are_offered_without_being_declared(product_server):
    server = product_server(FakeEngine(reply=_scripted(_call("calculator", expression="5 - 7"))))
    server.product.responses.default_tools = ("calculator",)
    body = _post(server, input="Subtract").json()
    assert body["output"][1]["output"] == "-2"
    # and they can be forced, by "required" or by name, as declared ones can
    for choice in ("required", {"type": "function", "name": "calculator"}):
        body = _post(server, input="Subtract", tool_choice=choice).json()
        assert body["output"][1]["output"] == "-2", body
    for choice, tools in (("required", []), ({"type": "function", "name": "sql_query"}, [])):
        server.product.responses.default_tools = ()
        raw = _post(server, input="x", tools=tools, tool_choice=choice)
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "tool_choice"


def test_a_client_function_named_like_a_builtin_is_the_clients(product_server):
    """A client function named code_interpreter on a server that offers code_interpreter by
    default: the model's call of it is the client's to run (it vanished, run by neither,
    when the default built-in took it, and the prompt listed two tools of that name)."""
    server = product_server(FakeEngine(reply=_scripted(_call("code_interpreter", code="1"))))
    server.product.responses.default_tools = ("code_interpreter",)
    own = {"type": "function", "name": "code_interpreter", "parameters": {"type": "object"}}
    body = _post(server, input="Run it", tools=[own]).json()
    assert [(i["type"], i.get("name")) for i in body["output"]] == [
        ("function_call", "code_interpreter")
    ]
    assert _prompt(server).count('"name": "code_interpreter"') == 1


def test_a_builtin_the_server_cannot_run_is_a_400_naming_it(product_server):
    server = product_server()
    server.product.responses.tools = ToolRegistry(
        [Calculator()], {"code_interpreter": "the code sandbox needs bubblewrap"}
    )
    sandboxed = {"type": "code_interpreter", "container": {"type": "auto"}}
    raw = _post(server, input="x", tools=[CALCULATOR, sandboxed])
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert error["param"] == "tools[1]" and "bubblewrap" in error["message"]
    raw = _post(server, input="x", tools=[{"type": "code_interpreter"}])  # no container
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "tools[0].container"
    # counted among all the request's tools, a file_search entry before it included
    search = {"type": "file_search", "vector_store_ids": ["vs_1"]}
    raw = _post(server, input="x", tools=[search, sandboxed])
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "tools[1]"
    # A built-in's name this server names a reason for, declared by name: the same 400.
    raw = _post(server, input="x", tools=[{"type": "function", "name": "code_interpreter"}])
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "tools[0]"
    assert _post(server, input="x", max_tool_calls=-1).json()["error"]["param"] == (
        "max_tool_calls"
    )


# A streamed request whose scripted reply is a code_interpreter call (`_sleeping_code_server`).
_SLEEPING_CODE_BODY = {
    "model": MODEL,
    "input": "Sleep",
    "stream": True,
    "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}],
}


@contextlib.contextmanager
def _sleeping_code_run(server: ProductServer, background: bool = False) -> Iterator[str]:
    """A streamed response (background: only it can be cancelled) whose code_interpreter
    call sleeps for two minutes, read until the code runs; yields the response id with the
    stream still open, closed on exit."""
    adapter = TypeAdapter(ResponseStreamEvent)
    body = {**_SLEEPING_CODE_BODY, "background": background}
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=30, json=body) as s:
        lines = s.iter_lines()  # held: a dropped iterator would close the stream
        for line in lines:
            if line.startswith("data: "):
                event = adapter.validate_json(line[len("data: ") :])
                if event.type == "response.created":
                    response_id = event.response.id
                if event.type == "response.code_interpreter_call.interpreting":
                    break
        yield response_id


def _sleeping_code_server(product_server) -> ProductServer:
    code = _call("code_interpreter", code="import time; time.sleep(120)")
    return product_server(FakeEngine(reply=_scripted(code)))


def test_cancel_during_a_code_run_ends_it_and_keeps_the_item(product_server):
    server = _sleeping_code_server(product_server)
    with _sleeping_code_run(server, background=True) as response_id:
        cancelled = httpx.post(f"{server.url}/v1/responses/{response_id}/cancel", timeout=30).json()
    assert cancelled["status"] == "cancelled"
    assert [(i["type"], i["status"]) for i in cancelled["output"]] == [
        ("code_interpreter_call", "incomplete")
    ]
    stored = httpx.get(f"{server.url}/v1/responses/{response_id}", timeout=10).json()
    assert stored["output"] == cancelled["output"]


def test_a_cancelled_code_run_is_closed_in_the_stream(product_server):
    """Each output_item.added of the stream gets its output_item.done, a code call cut
    by a cancel included, carrying the item as the final response holds it."""
    server = _sleeping_code_server(product_server)
    adapter = TypeAdapter(ResponseStreamEvent)
    seen = []
    body = {**_SLEEPING_CODE_BODY, "background": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=30, json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                seen.append(adapter.validate_json(line[len("data: ") :]))
                if seen[-1].type == "response.code_interpreter_call.interpreting":
                    response_id = seen[0].response.id
                    httpx.post(f"{server.url}/v1/responses/{response_id}/cancel", timeout=30)
    final = seen[-1]
    assert final.type == "response.incomplete" and final.response.status == "cancelled"
    added = [e.output_index for e in seen if e.type == "response.output_item.added"]
    done = {e.output_index: e.item for e in seen if e.type == "response.output_item.done"}
    assert added == sorted(done) == [0]
    assert done[0] == final.response.output[0]
    assert (done[0].type, done[0].status) == ("code_interpreter_call", "incomplete")


def test_a_client_that_disconnects_during_a_code_run_stops_the_loop(product_server):
    """Nobody is reading: the sandbox is killed and the response stored incomplete, at
    once rather than after the code's two minutes, and the model is not asked again."""
    server = _sleeping_code_server(product_server)
    with _sleeping_code_run(server) as response_id:
        pass  # the stream closes here, mid-run
    deadline = time.monotonic() + 20
    while (stored := httpx.get(f"{server.url}/v1/responses/{response_id}", timeout=10).json())[
        "status"
    ] == "in_progress":
        assert time.monotonic() < deadline, "the turn ran on after its client left"
        time.sleep(0.05)
    assert stored["status"] == "incomplete"
    assert [(i["type"], i["status"]) for i in stored["output"]] == [
        ("code_interpreter_call", "incomplete")
    ]
    assert len(server.engine.prompts) == 1  # no second model turn for nobody


def test_serve_flags_build_the_registry_or_refuse_to_start(tmp_path):
    args = build_parser().parse_args(["--default-tools", "calculator", "sql_query"])
    assert args.tool_database is None and args.default_tools == ["calculator", "sql_query"]
    assert {"calculator", "sql_query"} <= set(tool_registry(args).tools)
    missing = build_parser().parse_args(["--tool-database", str(tmp_path / "none.db")])
    with pytest.raises(ValueError, match="--tool-database"):
        tool_registry(missing)
    unknown = build_parser().parse_args(["--default-tools", "web_search"])
    with pytest.raises(ValueError, match="--default-tools web_search"):
        tool_registry(unknown)
