"""The agent loop, driven by a scripted model: rounds, parallel calls, errors as outputs,
max_tool_calls, client functions, and cancellation that kills a running sandbox."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace

import pytest
from openai.types.responses import ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from orchestrator.agent import Agent, _written_code, code_interpreter_as_function_items
from orchestrator.ids import new_id
from orchestrator.sandbox import Sandbox, running_pids
from orchestrator.tools import builtin_tools
from orchestrator.tools.base import ToolOutput
from tests.orchestrator.sandbox_helpers import FAST, wait_until_gone

ITEM = TypeAdapter(ResponseItem)
EVENT = TypeAdapter(ResponseStreamEvent)
USER = [{"type": "message", "role": "user", "content": "What were East China's sales?"}]


def call(name: str, **arguments) -> dict:
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "call_id": new_id("call"),
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def message(text: str) -> dict:
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


@dataclass
class ScriptedModel:
    """Plays back turns; a turn is a list of items or a function of the items seen."""

    turns: list
    seen: list[tuple[list[dict], bool]] = field(default_factory=list)

    async def __call__(self, items: list[dict], tools_enabled: bool) -> list[dict]:
        self.seen.append(([dict(i) for i in items], tools_enabled))
        turn = self.turns[len(self.seen) - 1]
        return turn(items) if callable(turn) else turn


@dataclass
class Gate:
    """A fake tool that returns once `release` is set (to observe concurrency)."""

    name: str
    release: asyncio.Event
    reply: str
    opens: asyncio.Event | None = None
    description: str = "test"
    parameters: dict = field(default_factory=dict)
    calls: int = 0

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        self.calls += 1
        if self.opens is not None:
            self.opens.set()
        await self.release.wait()
        return ToolOutput(self.reply)


def outputs_by_call(output: list[dict]) -> dict[str, str]:
    return {o["call_id"]: o["output"] for o in output if o["type"] == "function_call_output"}


def run(agent: Agent, items=USER):
    return asyncio.run(agent.run(items))


def test_several_rounds_feed_each_result_back_to_the_model():
    query = call(
        "sql_query",
        sql="SELECT SUM(revenue_usd) FROM sales "
        "WHERE region = 'East China' AND quarter = '2026-Q3'",
    )

    def second(items):
        total = items[-1]["output"].splitlines()[1]
        return [call("calculator", expression=f"{total} / 1000")]

    model = ScriptedModel([[query], second, [message("About 59 thousand dollars.")]])
    agent = Agent(model, builtin_tools().tools)
    result = run(agent)
    assert (result.status, result.tool_calls) == ("completed", 2)
    assert [o["type"] for o in result.output] == [
        "function_call",
        "function_call_output",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert result.output[1]["call_id"] == query["call_id"]
    assert result.output[1]["output"].startswith("SUM(revenue_usd)\n")
    total = float(result.output[1]["output"].splitlines()[1])
    assert result.output[3]["output"] == f"{total / 1000:g}"
    # Each turn saw the input and everything before it; the tools stayed enabled.
    assert [len(items) for items, _ in model.seen] == [1, 3, 5]
    assert all(enabled for _, enabled in model.seen)
    for item in result.output:
        ITEM.validate_python(item)


def test_calls_of_one_turn_run_concurrently_and_results_keep_call_order():
    async def scenario():
        release_a, release_b = asyncio.Event(), asyncio.Event()
        # a waits for b to start: it only finishes if both run at once.
        a = Gate("a", release_a, "from a")
        b = Gate("b", release_b, "from b", opens=release_a)
        release_b.set()
        first, second = call("a"), call("b")
        model = ScriptedModel([[message("Checking both."), first, second], [message("Done.")]])
        result = await asyncio.wait_for(Agent(model, {"a": a, "b": b}).run(USER), 30)
        return result, first, second

    result, first, second = asyncio.run(scenario())
    assert [o["type"] for o in result.output] == [
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    assert [o["call_id"] for o in result.output[3:5]] == [first["call_id"], second["call_id"]]
    assert outputs_by_call(result.output) == {
        first["call_id"]: "from a",
        second["call_id"]: "from b",
    }


class Broken:
    name = "broken"
    description = "always fails"
    parameters: dict = {}  # noqa: RUF012

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        raise RuntimeError("internal detail that must not reach the model")


def test_tool_failures_go_back_to_the_model_as_outputs():
    calls = [
        call("calculator", expression="1 / 0"),
        call("broken"),
        call("weather", city="x"),
        {**call("calculator"), "arguments": "{not json"},
        call("calculator", expr="1"),
    ]
    model = ScriptedModel([calls, [message("Sorry.")]])
    tools = {**builtin_tools().tools, "broken": Broken()}
    result = run(Agent(model, tools))
    assert result.status == "completed" and result.output[-1]["type"] == "message"
    got = outputs_by_call(result.output)
    assert [got[c["call_id"]] for c in calls] == [
        "Error: division by zero",
        "Error: the tool broken failed (RuntimeError).",
        "Error: the tool 'weather' is not available in this response",
        "Error: the arguments are not valid JSON",
        "Error: the argument 'expression' must be a non-empty string",
    ]
    # The model's next turn saw every error.
    assert len(model.seen[1][0]) == 1 + 2 * len(calls)


def test_only_the_requests_tools_run():
    release = asyncio.Event()
    release.set()
    secret = Gate("sql_query", release, "rows")
    attempt = call("sql_query", sql="SELECT 1")
    model = ScriptedModel([[attempt], [message("ok")]])
    result = run(Agent(model, {"calculator": builtin_tools().get("calculator")}))
    assert secret.calls == 0
    assert outputs_by_call(result.output)[attempt["call_id"]].endswith(
        "not available in this response"
    )


def test_max_tool_calls_refuses_extra_calls_then_asks_for_an_answer():
    def always_two(items):
        return [call("calculator", expression="1 + 1"), call("calculator", expression="2 + 2")]

    model = ScriptedModel([always_two, always_two, [message("Four.")]])
    result = run(Agent(model, builtin_tools().tools, max_tool_calls=3))
    assert (result.status, result.tool_calls) == ("completed", 3)
    assert [enabled for _, enabled in model.seen] == [True, True, False]
    outputs = [o["output"] for o in result.output if o["type"] == "function_call_output"]
    assert outputs == ["2", "4", "2", "Error: not run: this response reached max_tool_calls (3)."]


def test_a_code_call_over_the_budget_is_an_incomplete_code_item():
    first, code = call("calculator", expression="1"), call("code_interpreter", code="print(1)")
    model = ScriptedModel([[first, code], [message("One.")]])
    result = run(Agent(model, builtin_tools().tools, max_tool_calls=1))
    # The calls that ran are answered first, then the refused ones.
    assert [o["type"] for o in result.output] == [
        "function_call",
        "function_call_output",
        "code_interpreter_call",
        "message",
    ]
    refused = result.output[2]
    assert (refused["status"], refused["code"]) == ("incomplete", "print(1)")
    assert refused["outputs"][0]["logs"].startswith("Error: not run")
    ITEM.validate_python(refused)


def test_a_model_that_keeps_calling_tools_ends_incomplete():
    model = ScriptedModel([[call("calculator", expression="1")]] * 3)
    result = run(Agent(model, builtin_tools().tools, max_tool_calls=1))
    assert (result.status, result.incomplete_reason) == ("incomplete", "max_tool_calls")
    assert len(model.seen) == 2


def test_client_functions_end_the_loop_after_the_builtins_ran():
    mine, theirs = call("calculator", expression="6 * 7"), call("get_weather", city="Paris")
    model = ScriptedModel([[mine, theirs]])
    result = run(Agent(model, builtin_tools().tools, client_functions=["get_weather"]))
    assert result.status == "completed" and len(model.seen) == 1
    assert outputs_by_call(result.output) == {mine["call_id"]: "42"}
    assert theirs in result.output


def test_code_interpreter_items_and_events_have_openais_shapes():
    events: list[dict] = []
    code = "print(sum(range(10)))"
    model = ScriptedModel([[call("code_interpreter", code=code)], [message("45")]])
    tools = builtin_tools(sandbox=Sandbox(FAST)).tools
    result = run(Agent(model, tools, on_event=events.append))
    item = result.output[0]
    assert item["type"] == "code_interpreter_call" and item["status"] == "completed"
    assert item["code"] == code
    assert item["outputs"] == [{"type": "logs", "logs": "45"}]
    ITEM.validate_python(item)
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    for number, event in enumerate(events):
        assert event["output_index"] == 0
        EVENT.validate_python({**event, "sequence_number": number})
    # The next turn sees the call; a template renders it as a call and its result.
    seen_call = model.seen[1][0][-1]
    assert seen_call["id"] == item["id"]
    fc, fco = code_interpreter_as_function_items(seen_call)
    assert json.loads(fc["arguments"]) == {"code": code}
    assert (fco["call_id"], fco["output"]) == (fc["call_id"], "45")


def test_cancelling_during_a_code_run_kills_the_sandbox():
    events: list[dict] = []

    async def scenario():
        model = ScriptedModel([[call("code_interpreter", code="import time\ntime.sleep(60)")]])
        tools = builtin_tools(sandbox=Sandbox(replace(FAST, wall_seconds=60))).tools
        agent = Agent(model, tools, on_event=events.append)
        task = asyncio.create_task(agent.run(USER))
        while not any(e["type"].endswith("interpreting") for e in events):
            await asyncio.sleep(0.02)
        label = events[0]["item"]["id"]
        while len(running_pids(label)) < 3:  # bwrap, its init, the code
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return agent, label

    agent, label = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert wait_until_gone(label) == []
    assert agent.output[0]["status"] == "incomplete"


@dataclass
class FakeSearch:
    """A file_search stand-in: finds one result per query, or fails on "boom"."""

    name: str = "file_search"
    description: str = "test"
    parameters: dict = field(default_factory=dict)

    async def execute(self, arguments: dict, call_id: str):
        from orchestrator.tools.base import ToolError
        from orchestrator.tools.file_search import FileSearchOutput

        queries = arguments["queries"]
        if "boom" in queries:
            raise ToolError("the vector store is gone")
        results = [
            {"file_id": "file_1", "filename": "a.txt", "score": 1.0, "text": q, "attributes": {}}
            for q in queries
        ]
        return FileSearchOutput(f"[1] found {queries}", [], [*queries, "the question"], results)


def test_a_file_search_call_becomes_its_item_with_its_events():
    events: list[dict] = []
    model = ScriptedModel(
        [
            [call("file_search", queries=["glaciers"])],
            [call("file_search", queries=["boom"])],
            [message("Done.")],
        ]
    )
    agent = Agent(model, {"file_search": FakeSearch()}, on_event=events.append)
    result = asyncio.run(agent.run(USER))
    first, failed, answer = result.output
    assert first["type"] == "file_search_call" and first["status"] == "completed"
    assert first["queries"] == ["glaciers", "the question"]  # as the tool searched them
    assert first["results"][0]["text"] == "glaciers"
    assert agent.tool_results[first["id"]].text == "[1] found ['glaciers']"
    assert failed["status"] == "failed" and failed["results"] is None
    assert agent.tool_results[failed["id"]].text == "Error: the vector store is gone"
    for item in result.output:
        ITEM.validate_python(item)
    for event in events:
        EVENT.validate_python({**event, "sequence_number": 0})
    kinds = [(e["type"], e["output_index"]) for e in events]
    assert kinds == [
        ("response.output_item.added", 0),
        ("response.file_search_call.in_progress", 0),
        ("response.file_search_call.searching", 0),
        ("response.file_search_call.completed", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.file_search_call.in_progress", 1),
        ("response.file_search_call.searching", 1),
        ("response.output_item.done", 1),
    ]
    assert answer["type"] == "message"


def test_a_file_search_over_the_budget_is_incomplete():
    model = ScriptedModel(
        [
            [call("file_search", queries=["a"]), call("file_search", queries=["b"])],
            [message("Done.")],
        ]
    )
    agent = Agent(model, {"file_search": FakeSearch()}, max_tool_calls=1)
    output = asyncio.run(agent.run(USER)).output
    assert [(o["type"], o["status"]) for o in output] == [
        ("file_search_call", "completed"),
        ("file_search_call", "incomplete"),
        ("message", "completed"),
    ]
    assert "max_tool_calls" in agent.tool_results[output[1]["id"]].text


def test_the_code_of_a_cut_call_is_what_it_had_written():
    """Arguments cut anywhere, escapes and surrogate pairs included: the code up to its
    last whole character, never an invalid string."""
    code = 'print("hi\\n")\n# é 😀 end'
    arguments = json.dumps({"code": code})
    assert _written_code({"arguments": arguments}) == code
    prefix = len('{"code": "')
    for cut in range(prefix, len(arguments)):
        written = _written_code({"arguments": arguments[:cut]})
        assert code.startswith(written), (cut, written)
        written.encode("utf-8")  # no lone surrogate
    assert _written_code({"arguments": '{"other": "x'}) == ""
