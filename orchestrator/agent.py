"""The agent loop: model turn -> tool calls -> tools run -> results as items -> model again.

`Agent.run(input_items)` drives a `Model` (anything that turns the items so far into the
model's next output items) until a turn calls no tool, a client-executed function is
called (the client runs it and answers in its next request), or `max_tool_calls`
built-in calls have run. It knows nothing of HTTP, prompts or the engine: the server
side supplies the model turn (engine + context + tool-call parser) and turns the events
into the Responses stream.

Items follow OpenAI's Responses shapes. The model returns `message` and
`function_call` items; a call to a built-in tool becomes, once it has run:
  - `code_interpreter`: the function_call is replaced by a `code_interpreter_call` item
    (`code`, `container_id`, `outputs`: logs and images, `status`), as OpenAI's
    built-in tool appears;
  - `file_search`: the function_call is replaced by a `file_search_call` item (`queries`,
    `results`: null unless the request includes them, `status`); what the model reads
    is kept in `Agent.tool_results` under the item's id;
  - any other built-in (calculator, sql_query): a `function_call_output` item after the
    call, with the result (or the error) as `output`.
Calls of one turn run concurrently; their results are appended in call order (calls
refused for the max_tool_calls budget last, each with an error as its result). A tool's
failure is given back to the model as its output, never raised. The allowed tools are
fixed when the agent is made: nothing a tool returns can add one.

Cancelling the task running `run` cancels the tools in flight (a sandbox's process tree
is killed), marks their items `incomplete` and re-raises; `output` keeps what was done.

Events (for streaming) go to `on_event` as dicts shaped like OpenAI's Responses events,
without `sequence_number`; `output_index` counts in `Agent.output`:
  code_interpreter: response.output_item.added, response.code_interpreter_call.in_progress,
    response.code_interpreter_call_code.delta, response.code_interpreter_call_code.done,
    response.code_interpreter_call.interpreting, response.code_interpreter_call.completed,
    response.output_item.done;
  file_search: response.output_item.added, response.file_search_call.in_progress,
    response.file_search_call.searching, response.file_search_call.completed (not when
    it failed), response.output_item.done;
  other built-ins: response.output_item.added and .done of the function_call_output.
The model's own items (text, function calls) are streamed by the model turn itself.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from orchestrator.errors import QuotaExceededError, RateLimitError
from orchestrator.ids import new_id
from orchestrator.sandbox import SandboxUnavailable
from orchestrator.tools.base import Tool, ToolError, ToolOutput, ToolUnavailable
from orchestrator.tools.file_search import FILE_SEARCH, FileSearchOutput

log = logging.getLogger("tokenmill")

DEFAULT_MAX_TOOL_CALLS = 8
CODE_INTERPRETER = "code_interpreter"
ITEM_TOOLS = (CODE_INTERPRETER, FILE_SEARCH)  # built-ins whose call becomes an item of its own

Event = dict
EventSink = Callable[[Event], None]


class Model(Protocol):
    """One model turn: the items so far (input, then output) -> the turn's new output
    items (`message`, `function_call`). With `tools_enabled` False the turn must not
    call tools (tool_choice "none"): the loop asks for a final answer that way."""

    async def __call__(self, items: list[dict], tools_enabled: bool) -> list[dict]: ...


@dataclass
class AgentResult:
    output: list[dict]
    status: str  # "completed" | "incomplete"
    incomplete_reason: str | None  # "max_tool_calls" when the model would not stop
    tool_calls: int  # built-in calls run


def function_call_output(call_id: str, output: str) -> dict:
    return {
        "id": new_id("fco"),
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }


def code_interpreter_as_function_items(item: dict) -> tuple[dict, dict]:
    """A code_interpreter_call as the function_call + function_call_output pair a chat
    template renders (the tool call, then its logs as the tool's answer)."""
    call = {
        "type": "function_call",
        "call_id": item["id"],
        "name": CODE_INTERPRETER,
        "arguments": json.dumps({"code": item["code"]}, ensure_ascii=False),
    }
    logs = "\n".join(o["logs"] for o in item.get("outputs") or [] if o["type"] == "logs")
    if item["status"] != "completed":
        logs = f"{logs}\n[the code run did not complete: {item['status']}]".lstrip("\n")
    return call, function_call_output(item["id"], logs)


def file_search_as_function_items(item: dict, text: str) -> tuple[dict, dict]:
    """A file_search_call as the function_call + function_call_output pair a chat template
    renders; `text` is what the model read (or reads now) as the search's result, its
    sources spotlighted one by one already (`framed`: the prompt does not frame it again;
    a client's function that happens to be named file_search gets no such mark)."""
    call = {
        "type": "function_call",
        "call_id": item["id"],
        "name": FILE_SEARCH,
        "arguments": json.dumps({"queries": item["queries"]}, ensure_ascii=False),
    }
    return call, {**function_call_output(item["id"], text), "framed": True}


_CODE_START = re.compile(r'\s*\{\s*"code"\s*:\s*"')


def _written_code(call: dict) -> str:
    """The code a code_interpreter call holds; of a call the budget cut, the code it had
    written (its arguments stop inside the string), so the item shows what was cut."""
    try:
        code = _arguments(call).get("code")
        return _valid_text(code) if isinstance(code, str) else ""
    except ToolError:
        pass
    arguments = call["arguments"]
    start = _CODE_START.match(arguments)
    if start is None:
        return ""
    try:
        return _valid_text(json.loads(f'"{_complete_escapes(arguments[start.end() :])}"'))
    except json.JSONDecodeError:
        return ""


def _valid_text(value: str) -> str:
    """`value` without lone surrogates: JSON's `\\ud800` escape decodes to one (or a pair
    cut in half does), which no UTF-8 response can carry."""
    return value.encode("utf-8", "ignore").decode("utf-8")


def _complete_escapes(contents: str) -> str:
    """A JSON string's contents cut anywhere, up to the end of its last whole character
    (an escape cut short is dropped)."""
    end = i = 0
    while i < len(contents) and contents[i] != '"':
        if contents[i] == "\\":
            i += 6 if contents[i + 1 : i + 2] == "u" else 2
        else:
            i += 1
        if i <= len(contents):
            end = i
    return contents[:end]


def _arguments(call: dict) -> dict:
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except json.JSONDecodeError:
        raise ToolError("the arguments are not valid JSON") from None
    except RecursionError:
        raise ToolError("the arguments are nested too deeply") from None
    if not isinstance(arguments, dict):
        raise ToolError("the arguments must be a JSON object")
    return arguments


class Agent:
    def __init__(
        self,
        model: Model,
        tools: Mapping[str, Tool],
        client_functions: Iterable[str] = (),
        on_event: EventSink | None = None,
        max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
    ) -> None:
        self.model = model
        self.tools = MappingProxyType(dict(tools))  # this request's built-ins, fixed
        self.client_functions = frozenset(client_functions)
        self.on_event = on_event or (lambda event: None)
        self.max_tool_calls = max_tool_calls
        self.output: list[dict] = []
        self.tool_calls = 0
        self.tool_results: dict[str, ToolOutput] = {}  # file_search_call id -> its output

    async def run(self, input_items: list[dict]) -> AgentResult:
        tools_enabled = True
        while True:
            turn = await self.model([*input_items, *self.output], tools_enabled)
            calls = [item for item in turn if item["type"] == "function_call"]
            self.output += [item for item in turn if not self._is_item_call(item)]
            if not calls:
                return AgentResult(self.output, "completed", None, self.tool_calls)
            if not tools_enabled:
                return AgentResult(self.output, "incomplete", "max_tool_calls", self.tool_calls)
            await self._run_calls([c for c in calls if c["name"] not in self.client_functions])
            if any(c["name"] in self.client_functions for c in calls):
                return AgentResult(self.output, "completed", None, self.tool_calls)
            tools_enabled = self.tool_calls < self.max_tool_calls

    def _is_code_call(self, item: dict) -> bool:
        return (
            item["type"] == "function_call"
            and item["name"] == CODE_INTERPRETER
            and (CODE_INTERPRETER in self.tools)
        )

    def _is_search_call(self, item: dict) -> bool:
        return (
            item["type"] == "function_call"
            and item["name"] == FILE_SEARCH
            and (FILE_SEARCH in self.tools)
        )

    def _is_item_call(self, item: dict) -> bool:
        return self._is_code_call(item) or self._is_search_call(item)

    def _emit(self, kind: str, of: dict, **fields) -> None:
        """An event about the output item `of`."""
        index = next(i for i, o in enumerate(self.output) if o is of)
        self.on_event({"type": kind, "output_index": index, **fields})

    async def _run_calls(self, calls: list[dict]) -> None:
        """Run the calls the budget allows, concurrently; refuse the rest. Results are
        appended in call order, whatever order the tools finish in."""
        budget = max(self.max_tool_calls - self.tool_calls, 0)
        runs, refused = calls[:budget], calls[budget:]
        self.tool_calls += len(runs)
        started = [self._start(call) for call in runs]
        try:
            texts = await asyncio.gather(*(run for _, run in started))
        except asyncio.CancelledError:
            for item, _ in started:
                if item["type"] in ("code_interpreter_call", "file_search_call") and (
                    item["status"] not in ("completed", "failed")
                ):
                    item["status"] = "incomplete"
                    self._emit("response.output_item.done", item, item=copy.deepcopy(item))
            raise
        for call, text in zip(runs, texts, strict=True):
            if text is not None:
                self._add_output(call, text)
        self.not_run(refused, f"this response reached max_tool_calls ({self.max_tool_calls})")

    def not_run(self, calls: list[dict], why: str) -> None:
        """Record calls that will not run: a code_interpreter or file_search call as an
        incomplete item of its own, another as a function_call_output, each saying why."""
        refusal = f"Error: not run: {why}."
        for call in calls:
            if self._is_code_call(call):
                item = self._code_item(call, "incomplete", [{"type": "logs", "logs": refusal}])
                self._emit("response.output_item.added", item, item=copy.deepcopy(item))
                self._emit("response.output_item.done", item, item=copy.deepcopy(item))
            elif self._is_search_call(call):
                item = self._search_item(call, "incomplete")
                self.tool_results[item["id"]] = ToolOutput(refusal)
                self._emit("response.output_item.added", item, item=copy.deepcopy(item))
                self._emit("response.output_item.done", item, item=copy.deepcopy(item))
            else:
                self._add_output(call, refusal)

    def _start(self, call: dict) -> tuple[dict, Coroutine[None, None, str | None]]:
        """The item that holds the call's progress, announced by output_item.added here so
        that a run cancelled before it starts still closes an announced item, and the
        coroutine that runs it (its result: the text of the call's function_call_output,
        None for code)."""
        if self._is_code_call(call):
            item = self._code_item(call, "in_progress", None)
            # The code arrives by the delta events, as it would while the model wrote it.
            self._emit("response.output_item.added", item, item={**copy.deepcopy(item), "code": ""})
            return item, self._run_code(call, item)
        if self._is_search_call(call):
            item = self._search_item(call, "in_progress")
            self._emit("response.output_item.added", item, item=copy.deepcopy(item))
            return item, self._run_search(call, item)
        return call, self._run_function(call)

    def _code_item(self, call: dict, status: str, outputs: list[dict] | None) -> dict:
        item = {
            "id": new_id("ci"),
            "type": "code_interpreter_call",
            "status": status,
            "code": _written_code(call),
            "container_id": new_id("cntr"),
            "outputs": outputs,
        }
        self.output.append(item)
        return item

    def _search_item(self, call: dict, status: str) -> dict:
        try:
            queries = _arguments(call).get("queries")
        except ToolError:
            queries = None
        if not (isinstance(queries, list) and all(isinstance(q, str) for q in queries)):
            queries = []
        queries = [_valid_text(q) for q in queries]
        item = {
            "id": new_id("fs"),
            "type": "file_search_call",
            "status": status,
            "queries": queries,
            "results": None,
        }
        self.output.append(item)
        return item

    async def _execute(self, call: dict, label: str) -> tuple[ToolOutput, bool]:
        """The tool's output and whether it failed; a tool's failure becomes an output the
        model can read, never an exception. Only the user's quota or rate limit refusing
        the tool's work ends the response instead (Turn fails it with rate_limit_exceeded)."""
        try:
            tool = self.tools.get(call["name"])
            if tool is None:
                raise ToolError(f"the tool '{call['name']}' is not available in this response")
            return await tool.execute(_arguments(call), label), False
        except (QuotaExceededError, RateLimitError):
            raise  # the user's budget (a search's embeddings) ends the response, as a turn's does
        except (ToolError, ToolUnavailable, SandboxUnavailable) as exc:
            message = f"Error: {exc}"
        except Exception as exc:
            log.exception("built-in tool %s failed", call["name"])
            message = f"Error: the tool {call['name']} failed ({type(exc).__name__})."
        return ToolOutput(message, [{"type": "logs", "logs": message}]), True

    async def _run_function(self, call: dict) -> str:
        result, _ = await self._execute(call, call["call_id"])
        return result.text

    def _add_output(self, call: dict, text: str) -> None:
        item = function_call_output(call["call_id"], _valid_text(text))
        self.output.append(item)
        self._emit("response.output_item.added", item, item=copy.deepcopy(item))
        self._emit("response.output_item.done", item, item=copy.deepcopy(item))

    async def _run_code(self, call: dict, item: dict) -> None:
        ids = {"item_id": item["id"]}
        self._emit("response.code_interpreter_call.in_progress", item, **ids)
        self._emit("response.code_interpreter_call_code.delta", item, delta=item["code"], **ids)
        self._emit("response.code_interpreter_call_code.done", item, code=item["code"], **ids)
        item["status"] = "interpreting"
        self._emit("response.code_interpreter_call.interpreting", item, **ids)
        result, failed = await self._execute(call, item["id"])
        item["outputs"] = result.outputs
        item["status"] = "failed" if failed else "completed"
        self._emit("response.code_interpreter_call.completed", item, **ids)
        self._emit("response.output_item.done", item, item=copy.deepcopy(item))

    async def _run_search(self, call: dict, item: dict) -> None:
        ids = {"item_id": item["id"]}
        self._emit("response.file_search_call.in_progress", item, **ids)
        item["status"] = "searching"
        self._emit("response.file_search_call.searching", item, **ids)
        result, failed = await self._execute(call, item["id"])
        self.tool_results[item["id"]] = result
        if isinstance(result, FileSearchOutput):
            item["queries"], item["results"] = result.queries, result.results
        item["status"] = "failed" if failed else "completed"
        if not failed:
            self._emit("response.file_search_call.completed", item, **ids)
        self._emit("response.output_item.done", item, item=copy.deepcopy(item))
