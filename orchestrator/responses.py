"""Responses: create, retrieve, cancel and delete; one `Turn` per response being generated.

A turn runs as its own task, apart from the HTTP request that started it: it records
the response as `in_progress`, feeds the engine's tokens through the tool-call parser
into `ResponseEvents`, and records the final state once generation ends, however it
ends: completed, cut by max_output_tokens, cancelled, or stopped because the client went
away (then `incomplete`, with the text generated so far). Because the final write
happens in the turn's own task, a client that disconnects cannot interrupt it. The
final event is sent only after that write commits, so a client that saw
`response.completed` can always read the response back.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from engine import SamplingParams
from engine.client import EngineClient
from engine.errors import EngineError, EngineShutdownError
from engine.sampling_params import RequestOutputKind
from engine.structured_output import StructuredOutputsParams
from orchestrator.accounts.identity import cache_salt
from orchestrator.accounts.meter import CHECKPOINT_S
from orchestrator.agent import (
    CODE_INTERPRETER,
    DEFAULT_MAX_TOOL_CALLS,
    ITEM_TOOLS,
    Agent,
    code_interpreter_as_function_items,
    file_search_as_function_items,
)
from orchestrator.chat_types import Tool
from orchestrator.citations import file_citations
from orchestrator.context import ContextBuilder, Prompt, ToolConfig, item_text
from orchestrator.conversation_lock import ConversationLock
from orchestrator.errors import (
    InvalidRequestError,
    NotFoundError,
    ProductError,
    QuotaExceededError,
    RateLimitError,
)
from orchestrator.events import Event, ResponseEvents, usage
from orchestrator.ids import new_id
from orchestrator.items import item_list, stored_item
from orchestrator.output_structure import (
    ANY_OBJECT,
    plain_answer,
    require_json_mention,
    turn_structure,
)
from orchestrator.store import History, Page, Repository, Store, StoreUnavailableError
from orchestrator.tool_parser import ChoiceAssembler, ParsedCall
from orchestrator.tools import ResolvedTools, ToolRegistry, ToolUnavailable, builtin_tools
from orchestrator.tools.file_search import (
    FILE_SEARCH,
    FileSearch,
    FileSearchBackend,
    FileSearchTool,
)

log = logging.getLogger("tokenmill")

ANSWER_REMINDER = (
    "Question: {}\nAnswer the question in one short sentence, using the results above."
)


@dataclass
class FunctionTool:
    """A client-executed function the model may call (Responses' flat tool shape)."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_dict(self) -> dict:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }

    def chat_tool(self) -> Tool:
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        spec = {k: v for k, v in function.items() if v is not None}
        return Tool(self.name, {"type": "function", "function": spec})


@dataclass
class CodeInterpreterTool:
    """The built-in code_interpreter tool (`{"type": "code_interpreter", "container":
    {"type": "auto"}}`); the server runs its calls in a sandbox."""

    container: dict | str
    name: str = CODE_INTERPRETER

    def as_dict(self) -> dict:
        return {"type": "code_interpreter", "container": self.container}


@dataclass
class ResponseRequest:
    """A validated `POST /v1/responses` body (the server parses and checks it)."""

    model: str
    input: list[dict]  # items without ids: message, function_call, function_call_output
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    truncation: str = "disabled"  # "disabled" | "auto"
    metadata: dict = field(default_factory=dict)
    tools: list[FunctionTool | CodeInterpreterTool | FileSearchTool] = field(default_factory=list)
    # "none" | "auto" | "required" | {"type": "function", "name"} | {"type": "file_search"}
    # | {"type": "code_interpreter"}
    tool_choice: str | dict = "auto"
    parallel_tool_calls: bool = True
    # text.format as given: {"type": "text"}, {"type": "json_object"} or
    # {"type": "json_schema", "name", "schema", "strict"[, "description"]}.
    text_format: dict = field(default_factory=lambda: {"type": "text"})
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS  # built-in calls one response may run
    include: list[str] = field(default_factory=list)  # e.g. "file_search_call.results"
    user: str | None = None  # the client's own end-user label, echoed (OpenAI's, deprecated)

    def format_schema(self) -> dict | None:
        """The JSON schema text.format asks for (None: free text)."""
        kind = self.text_format["type"]
        if kind == "text":
            return None
        return ANY_OBJECT if kind == "json_object" else self.text_format["schema"]

    def tool_config(self, declared: list[FunctionTool] | None = None) -> ToolConfig:
        """The tools offered to the model: `declared` (every tool's function declaration,
        built-ins with their schema filled in) or the request's own function tools."""
        tools = (
            declared
            if declared is not None
            else [t for t in self.tools if isinstance(t, FunctionTool)]
        )
        choice = self.tool_choice
        mode, forced = (
            ("function", choice.get("name", choice["type"]))
            if isinstance(choice, dict)
            else (choice, None)
        )
        if not tools:
            mode = "none"
        offered = [t for t in tools if mode != "function" or t.name == forced]
        return ToolConfig(
            [t.chat_tool() for t in offered] if mode != "none" else [],
            mode,
            forced,
            self.parallel_tool_calls,
        )


class TokenObserver(Protocol):
    """Latency metrics hook (the server's RequestTimer)."""

    def on_tokens(self, count: int) -> None: ...

    def on_finished(self) -> None: ...


class _NoObserver:
    def on_tokens(self, count: int) -> None:
        pass

    def on_finished(self) -> None:
        pass


class Budget(Protocol):
    """The requester's token allowance (`orchestrator.accounts.Meter`): each generation
    reserves its prompt plus output budget before it runs (QuotaExceededError or
    RateLimitError when that does not fit; a later generation passes what the earlier
    ones `spent`), the turn checkpoints its usage so far as it runs, and settles once,
    with its usage."""

    async def reserve(self, tokens: int, spent: int | None = None) -> None: ...

    async def checkpoint(
        self, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None: ...

    async def settle(
        self, status: str, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None: ...


class _Unlimited:
    async def reserve(self, tokens: int, spent: int | None = None) -> None:
        pass

    async def checkpoint(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        pass

    async def settle(
        self, status: str, input_tokens: int, cached_tokens: int, output_tokens: int
    ) -> None:
        pass


def _structure(
    request: ResponseRequest, config: ToolConfig, tools: ResolvedTools, answering: bool = False
) -> StructuredOutputsParams | None:
    """The grammar a model turn's output must follow: text.format's JSON, and the turn's
    offered tools' calls (forced by "required" or a named function, lazily triggered by
    "auto"), a built-in's arguments under its enforced schema (`argument_schema`), which
    can be stricter than the parameters the prompt lists. A schema the grammar cannot
    take is a 400 naming its field. `answering`: the turn answers after tool results,
    offered no tools; as text, it cannot open with `<` (`plain_answer`)."""
    if answering and request.format_schema() is None:
        return plain_answer()
    functions = [(t.name, tools.call_schema(t.name, t.spec["function"])) for t in config.tools]
    return turn_structure(
        functions,
        config.mode,
        config.parallel,
        request.format_schema(),
        "text.format",
        "text.format.schema",
    )


def _check_tool_choice(choice: str | dict, offered: list[FunctionTool]) -> None:
    """A tool choice that forces a call needs the tool: among the request's own, or the
    server's default tools, which are offered without being declared. A built-in is
    named by its type (`{"type": "code_interpreter"}`), a function by its name."""
    if choice == "required" and not offered:
        raise InvalidRequestError('tool_choice "required" needs tools', "tool_choice")
    name = choice.get("name", choice["type"]) if isinstance(choice, dict) else None
    if name is not None and name not in {t.name for t in offered}:
        raise InvalidRequestError(
            f"tool_choice names the tool {name!r}, which is not in tools", "tool_choice"
        )


def _check_json_mention(request: ResponseRequest, history: History) -> None:
    """The json_object format needs the word JSON in the instructions, a message or a tool
    result of the context, as OpenAI requires of chat messages."""
    if request.text_format["type"] != "json_object":
        return
    texts = [request.instructions]
    for item in [*history.items, *request.input]:  # messages and tool results, as in chat
        kind = item.get("type", "message")
        texts.append(item_text(item) if kind == "message" else item.get("output"))
    require_json_mention(texts, "input", "text.format")


def _sampling_params(request: ResponseRequest) -> SamplingParams:
    chosen = {"temperature": request.temperature, "top_p": request.top_p}
    try:
        return SamplingParams(
            max_tokens=request.max_output_tokens,
            **{k: v for k, v in chosen.items() if v is not None},
        )
    except ValueError as exc:  # SamplingParams names the field first
        message = str(exc).replace("max_tokens", "max_output_tokens")
        raise InvalidRequestError(message, param=message.split(" ", 1)[0]) from None


def _new_response(request: ResponseRequest) -> dict:
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),  # whole seconds, as OpenAI gives them
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "conversation": {"id": request.conversation_id} if request.conversation_id else None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "metadata": request.metadata,
        "model": request.model,
        "output": [],
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "store": request.store,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": request.text_format},
        "tool_choice": request.tool_choice,
        "tools": [t.as_dict() for t in request.tools],
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation,
        "usage": None,
        "user": request.user,
    }


@dataclass
class _Progress:
    """What one engine generation has gathered so far."""

    assembler: ChoiceAssembler
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0


@dataclass
class _Totals:
    """Token counts over all of a turn's generations, and the latest prompt + output
    (what the next response's prompt extends)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached: int = 0
    context_tokens: list[int] | None = None


class _Cut(Exception):
    """A generation ended without finishing its answer: stop the agent loop there."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason  # the incomplete reason ("max_output_tokens") or None


class Turn:
    """One response being generated: events flow to `stream()`, the end to `wait()`.

    The turn is an agent loop (`orchestrator.agent.Agent`): each model turn is one engine
    generation over instructions + history + input + the output so far, built-in tool
    calls run server-side between them, and a call of a client function ends the turn.
    The agent appends to the response's own output list, so its `output_index`es are
    the stream's."""

    def __init__(
        self,
        service: ResponseService,
        owner: str,
        request: ResponseRequest,
        history: History,
        input_items: list[dict],
        tools: ResolvedTools,
        prompt: Prompt,
        params: SamplingParams,
        observer: TokenObserver,
        budget: Budget,
    ) -> None:
        self.service = service
        self.owner = owner
        self.request = request
        self.history = history
        self.input_items = input_items
        self.tools = tools
        self.declared = [
            FunctionTool(d["name"], d.get("description"), d.get("parameters"), d.get("strict"))
            for d in tools.declarations
        ]
        self.prompt: Prompt | None = prompt  # the first generation's, built by `create`
        self.params = params
        self.observer = observer
        self.budget = budget
        self.events = ResponseEvents(_new_response(request))
        self.id: str = self.events.response["id"]
        self.totals = _Totals()
        # The generation running now: its prompt length and progress (`_usage_so_far`).
        self._running: tuple[int, _Progress] | None = None
        self._generations = 0
        self._code_calls: list[dict] = []  # code_interpreter/file_search calls of the turn
        self._agent: Agent | None = None
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._stop_status: str | None = None
        self._begin_recorded = False  # the in_progress row is written (`_record`)
        self._turn_over = asyncio.Event()  # ends the checkpoints (`_checkpoint`)
        self._checkpoints: asyncio.Task | None = None
        self._consumer: asyncio.Task | None = None
        self._task = asyncio.create_task(self._run())

    async def stream(self) -> AsyncIterator[Event]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def wait(self) -> dict:
        """The final response (shielded: a caller giving up does not stop the turn)."""
        await asyncio.shield(self._task)
        return self.events.response

    def stop(self, status: str) -> None:
        """End generation early: "cancelled" (the cancel endpoint) or "incomplete" (the
        client went away); running tools are cancelled (sandboxes killed). A no-op once
        the turn has finished."""
        if self._task.done() or self._stop_status is not None:
            return
        self._stop_status = status
        if self._consumer is not None:
            self._consumer.cancel()

    def _put(self, events: list[Event]) -> None:
        for event in events:
            self._queue.put_nowait(event)

    async def _run(self) -> None:
        store = self.service.store if self.request.store else None
        begun = None
        if store is not None:
            snapshot = copy.deepcopy(self.events.response)
            begun = asyncio.create_task(
                store.call(Repository.begin_response, self.owner, snapshot, self.input_items)
            )
        self._checkpoints = asyncio.create_task(self._checkpoint(store, begun))
        try:
            self._put(self.events.start())
            status, reason, error = await self._generate()
            await self._stop_checkpoints()
            totals = self.totals
            final = self.events.finish(
                status,
                usage(totals.input_tokens, totals.output_tokens, totals.cached),
                int(time.time()),
                reason,
                error,
                annotate=self._annotate,
            )
            recorded = True
            if store is not None:
                tokens = None if status == "failed" else totals.context_tokens
                recorded = await self._record_or_retry(store, begun, tokens)
            await self._settle(status)
            self._put(final if recorded else [self.events.error(UNRECORDED)])
        except Exception:
            log.exception("response %s could not be completed", self.id)
            self._put([self.events.error("the response could not be recorded")])
        finally:
            await self._stop_checkpoints()
            if self.request.conversation_id is not None:
                await self.service.lock.release(self.owner, self.request.conversation_id)
            await self._settle("failed")  # a no-op when settled above
            self._queue.put_nowait(None)
            self.service.running.pop(self.id, None)
            self.observer.on_finished()

    async def _checkpoint(self, store: Store | None, begun: asyncio.Task | None) -> None:
        """Every CHECKPOINT_S (orchestrator/accounts/meter.py) while the turn runs, write its
        usage so far and (when stored) its output as it stands, so a crash of the server
        loses only the last seconds of it (Repository.checkpoint_response) and still leaves
        its usage row (`Budget.checkpoint`)."""
        written: list[dict] = []
        while True:
            try:
                await asyncio.wait_for(self._turn_over.wait(), CHECKPOINT_S)
                return
            except TimeoutError:
                pass
            try:
                await self.budget.checkpoint(*self._usage_so_far())
            except Exception as exc:  # the next one, or the settlement, writes it
                log.warning("response %s: its usage so far was not checkpointed: %r", self.id, exc)
            if store is not None and begun is not None:
                written = await self._checkpoint_output(store, begun, written)

    async def _checkpoint_output(
        self, store: Store, begun: asyncio.Task, written: list[dict]
    ) -> list[dict]:
        """Write the output, with the usage so far, if it changed since `written`; returns
        what is written now."""
        try:
            await begun
        except StoreUnavailableError:
            return written  # no row to write to; the final record writes both
        output = copy.deepcopy(self.events.output)
        if output == written:
            return written
        input_tokens, cached, output_tokens = self._usage_so_far()
        so_far = usage(input_tokens, output_tokens, cached)
        try:
            await store.call(Repository.checkpoint_response, self.owner, self.id, output, so_far)
        except StoreUnavailableError:
            return written  # the next one, or the final record, writes it
        return output

    def _usage_so_far(self) -> tuple[int, int, int]:
        """(input, cached, output) tokens of the generations so far, the running one's
        included."""
        totals = self.totals
        if self._running is None:
            return totals.input_tokens, totals.cached, totals.output_tokens
        prompt, progress = self._running
        return (
            totals.input_tokens + prompt,
            totals.cached + progress.cached,
            totals.output_tokens + len(progress.output_ids),
        )

    async def _stop_checkpoints(self) -> None:
        """End the checkpoints and wait for one being written (a write in its thread cannot
        be cancelled), so none lands after the final record."""
        self._turn_over.set()
        if self._checkpoints is not None:
            await asyncio.gather(self._checkpoints, return_exceptions=True)

    async def _record(self, store: Store, begun: asyncio.Task, tokens: list[int] | None) -> None:
        """Write the turn's final state, and its start first if that write failed."""
        if not self._begin_recorded:
            try:
                await begun
            except StoreUnavailableError:
                await store.call(
                    Repository.begin_response, self.owner, self.events.response, self.input_items
                )
            self._begin_recorded = True
        await store.call(
            Repository.finish_response, self.owner, self.events.response, self.input_items, tokens
        )

    async def _record_or_retry(
        self, store: Store, begun: asyncio.Task, tokens: list[int] | None
    ) -> bool:
        """`_record`; False when the database does not answer, the record then retried in
        the background (`_record_until_stored`)."""
        try:
            await self._record(store, begun, tokens)
        except StoreUnavailableError as exc:
            log.error("response %s could not be recorded: %s", self.id, exc)
            self.service.record_later(self._record_until_stored(store, begun, tokens))
            return False
        return True

    async def _record_until_stored(
        self, store: Store, begun: asyncio.Task, tokens: list[int] | None
    ) -> None:
        """`_record`, again every few seconds while the database does not answer, so that a
        short outage leaves no response `in_progress` (and its conversation locked)."""
        deadline = time.monotonic() + RECORD_RETRY_S
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._record(store, begun, tokens)
            except StoreUnavailableError as exc:
                if time.monotonic() > deadline:
                    log.error("response %s was never recorded: %s", self.id, exc)
                    return
                delay = min(delay * 2, 30.0)
                continue
            log.info("response %s recorded once the database answered", self.id)
            return

    async def _settle(self, status: str) -> None:
        totals = self.totals
        await self.budget.settle(status, totals.input_tokens, totals.cached, totals.output_tokens)

    async def _generate(self) -> tuple[str, str | None, dict | None]:
        """Run the agent loop; returns (status, incomplete reason, error).

        The loop runs in a task of its own, which `stop` cancels: a stopped turn ends at
        once even if the engine has no further output to deliver or a tool is running."""
        agent = Agent(
            self._model_turn,
            self.tools.builtins,
            self.tools.client_functions,
            self._tool_event,
            self.request.max_tool_calls,
        )
        agent.output = self.events.output
        self._agent = agent
        self._consumer = asyncio.create_task(agent.run(self.input_items))
        try:
            result = await self._consumer
        except asyncio.CancelledError:
            if self._stop_status is None:
                raise  # the turn itself is being cancelled (shutdown)
            return self._stop_status, None, None
        except EngineShutdownError:
            # `server_error`: a response's error code is one of OpenAI's (the SDK's
            # ResponseError.code), which has none for a shutdown; the message says it.
            message = "the server shut down before this response finished"
            return "failed", None, {"code": "server_error", "message": message}
        except (EngineError, ValueError) as exc:
            return "failed", None, {"code": "server_error", "message": f"the engine failed: {exc}"}
        except InvalidRequestError as exc:  # the tools' output no longer fits the context
            return "failed", None, _turn_error("invalid_prompt", exc)
        except (QuotaExceededError, RateLimitError) as exc:  # a later generation's budget
            return "failed", None, _turn_error("rate_limit_exceeded", exc)
        except _Cut as cut:
            return "incomplete", cut.reason, None
        if result.status == "incomplete":
            return "incomplete", result.incomplete_reason, None
        return "completed", None, None

    def _tool_event(self, event: dict) -> None:
        self._put([self.events.numbered(event)])

    def _prompt_items(self, output: list[dict]) -> list[dict]:
        """This turn's output as the prompt shows it: code_interpreter and file_search
        calls as function call + output pairs (the context builder frames each output)."""
        items = []
        for item in output:
            if item["type"] == "code_interpreter_call":
                items += code_interpreter_as_function_items(item)
            elif item["type"] == "file_search_call":
                items += self._search_items(item)
            else:
                items.append(item)
        return items

    def _search_items(self, item: dict) -> tuple[dict, dict]:
        """A file_search_call as the call and output the prompt shows: this turn's results
        (spotlighted source by source already, so the output is marked framed)."""
        found = self._agent.tool_results.get(item["id"]) if self._agent else None
        text = found.text if found is not None else "[the search did not run]"
        return file_search_as_function_items(item, text)

    def _searched_enough(self) -> bool:
        """Whether file_search, the only tool, has run in this response: the next turn
        is then asked to answer without tools. (Offered tools after its results, the
        default 135M model answers with a made-up `<tool_response>` block instead.)"""
        return [d["name"] for d in self.tools.declarations] == [FILE_SEARCH] and any(
            item["type"] == "file_search_call" for item in self.events.output
        )

    def _forced_call_made(self) -> bool:
        """Whether the request named the tool to call (tool_choice `{"type": "function",
        "name": ...}` or `{"type": "code_interpreter"}`) and a generation has made that
        call: the next turn is then offered no tools and answers. (Offered them again,
        the default 135M model calls the tool once more or writes a made-up
        `<tool_response>` block.)"""
        choice = self.request.tool_choice
        return (
            self._generations > 0
            and isinstance(choice, dict)
            and choice["type"] in ("function", CODE_INTERPRETER)
        )

    def _search_forced(self, config: ToolConfig) -> bool:
        """Whether this turn must call file_search and nothing else (tool_choice
        `{"type": "file_search"}`, or "required" with file_search the only tool) while
        the input has a user message. Then the model is not asked to write the call: the
        search runs on the user's message, which is what a forced call of a small model
        would have asked less well (the default 135M model writes queries such as
        "file_search_query_id", call after call)."""
        search = self.tools.builtins.get(FILE_SEARCH)
        if not isinstance(search, FileSearch) or search.question is None:
            return False
        names = [t.name for t in config.tools]
        return (config.mode == "function" and config.forced == FILE_SEARCH) or (
            config.mode == "required" and names == [FILE_SEARCH]
        )

    def _annotate(self, text: str) -> list[dict]:
        """The file citations of an answer written after file_search showed sources."""
        search = self.tools.builtins.get(FILE_SEARCH)
        if not isinstance(search, FileSearch):
            return []
        return file_citations(text, search.sources, search.question)

    def _next_prompt(self, items: list[dict], config: ToolConfig) -> tuple[Prompt, SamplingParams]:
        limit = self.request.max_output_tokens
        left = None if limit is None else limit - self.totals.output_tokens
        if left is not None and left < 1:
            raise _Cut("max_output_tokens")
        made = items[len(self.input_items) :]
        shown, answering = _prompt_input(
            self.history.items, self.input_items, made, self._prompt_items(made), config
        )
        structure = _structure(self.request, config, self.tools, answering)
        params = dataclasses.replace(self.params, max_tokens=left, structured_outputs=structure)
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            return prompt, params
        history = History(self.history.items, self.totals.context_tokens)
        prompt = self.service.context.build(
            self.request.instructions,
            history,
            shown,
            config,
            left,
            truncate=self.request.truncation == "auto",
        )
        return prompt, params

    async def _model_turn(self, items: list[dict], tools_enabled: bool) -> list[dict]:
        """One engine generation: streams its text and calls, returns its new items
        (taken back out of the output list, where the agent appends them again)."""
        request = self.request
        if self._generations > 0:  # a forced or required call was made: now free to answer
            request = dataclasses.replace(request, tool_choice="auto")
        offered = tools_enabled and not (self._searched_enough() or self._forced_call_made())
        config = request.tool_config(self.declared if offered else [])
        if self._generations == 0 and self._search_forced(config):
            self._generations += 1
            self.prompt = None  # the first prompt asked for the call this replaces
            return [
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "call_id": new_id("call"),
                    "name": FILE_SEARCH,
                    "arguments": '{"queries": []}',
                    "status": "completed",
                }
            ]
        # In a thread: a large text.format schema's grammar, and a long history's prompt,
        # take up to a second to build, which the event loop's other streams need not wait for.
        prompt, params = await asyncio.to_thread(self._next_prompt, items, config)
        request_id = self.id if self._generations == 0 else f"{self.id}-{self._generations}"
        if self._generations > 0:  # the first was reserved before the turn started
            await self.budget.reserve(
                output_budget(
                    len(prompt.token_ids), params.max_tokens, self.service.engine.max_model_len
                ),
                spent=self.totals.input_tokens + self.totals.output_tokens,
            )
        self._generations += 1
        start = len(self.events.output)
        self._code_calls = []
        progress = _Progress(
            ChoiceAssembler([t.name for t in config.tools], None if config.parallel else 1)
        )
        self._running = (len(prompt.token_ids), progress)
        try:
            await self._consume(progress, prompt.token_ids, params, request_id)
        finally:
            self._running = None
            totals = self.totals
            totals.input_tokens += len(prompt.token_ids)
            totals.output_tokens += len(progress.output_ids)
            totals.cached += progress.cached
            totals.context_tokens = prompt.token_ids + progress.output_ids
            if progress.finish_reason is None:
                await self.service.engine.abort(request_id)
            if progress.finish_reason in (None, "abort"):
                self._emit(progress.assembler.push("", final=True))  # the text held back
        if progress.finish_reason != "stop":
            reason = "max_output_tokens" if progress.finish_reason == "length" else None
            if reason is not None and self._agent is not None:
                # The built-in calls this generation wrote stay in the response, as not run.
                builtin = [
                    item
                    for item in self.events.output[start:]
                    if item["type"] == "function_call"
                    and item["name"] in self.tools.builtins
                    and item["status"] == "completed"
                ]
                why = f"this response reached {reason}"
                self._agent.not_run([*builtin, *self._code_calls], why)
            raise _Cut(reason)
        self._put(self.events.close_message(self._annotate))
        new = self.events.output[start:]
        del self.events.output[start:]
        return [*new, *self._code_calls]

    async def _consume(
        self, progress: _Progress, prompt: list[int], params: SamplingParams, request_id: str
    ) -> None:
        outputs = self.service.engine.generate(prompt, params, request_id)
        async with aclosing(outputs):
            async for out in outputs:
                for o in out.outputs:
                    progress.output_ids += o.token_ids
                    self.observer.on_tokens(len(o.token_ids))
                    progress.finish_reason = o.finish_reason or progress.finish_reason
                    self._emit(progress.assembler.push_delta(o.text, o.finish_reason))
                if out.finished:
                    progress.cached = out.num_cached_tokens

    def _emit(self, pieces: list) -> None:
        """Text and whole calls become events; a call's streamed pieces (`CallStart`,
        `ArgumentsDelta`) are not needed here, since its `ParsedCall` carries it all. A
        code_interpreter or file_search call is not streamed as a function call: the agent
        turns it into a code_interpreter_call or file_search_call item, with events of
        its own."""
        for piece in pieces:
            if isinstance(piece, str):
                self._put(self.events.text(piece))
            elif isinstance(piece, ParsedCall) and (
                piece.name in ITEM_TOOLS and piece.name in self.tools.builtins
            ):
                self._put(self.events.close_message())
                self._code_calls.append(
                    {
                        "id": new_id("fc"),
                        "type": "function_call",
                        "call_id": new_id("call"),
                        "name": piece.name,
                        "arguments": piece.arguments,
                        "status": "completed",
                    }
                )
            elif isinstance(piece, ParsedCall):
                self._put(self.events.function_call(piece))


def _turn_error(code: str, exc: ProductError) -> dict:
    """A failed response's `error` for a refusal after its turn started: `code` is the
    closest of OpenAI's codes for a response (the SDK's ResponseError.code, which has no
    `insufficient_quota` or `context_length_exceeded`), and the message starts with the
    refusal's own code, which says the cause."""
    cause = exc.code or "invalid_request"
    message = exc.message if cause == code else f"{cause}: {exc.message}"
    return {"code": code, "message": message}


def output_budget(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """What one generation may cost: its prompt plus the most it may generate (its
    max_tokens, else what the context window leaves)."""
    most = max_model_len - prompt_tokens if max_tokens is None else max_tokens
    return prompt_tokens + max(most, 0)


def _prompt_input(
    history: list[dict],
    input_items: list[dict],
    made: list[dict],
    output: list[dict],
    config: ToolConfig,
) -> tuple[list[dict], bool]:
    """What a generation's prompt shows after the history (the input, this turn's output
    so far as the prompt renders it, `output`), and whether it is an answer turn: tool
    results end it (this turn's own, or the client's function_call_output closing the
    input) and it is offered no tools. An answer turn's prompt repeats the question."""
    shown = [*input_items, *output]
    answering = not config.tools and (shown or [{}])[-1].get("type") == "function_call_output"
    # The question may be in the history when the input holds only the tool results.
    question = _question([*history, *input_items])
    # file_search's own output ends with the question already (and how to cite).
    searched = bool(made) and made[-1]["type"] == "file_search_call"
    if answering and question is not None and not searched:
        shown.append(_question_reminder(question))
    return shown, answering


def _question_reminder(question: str) -> dict:
    """The user message that follows tool results on an answer turn: the question again,
    outside the results' untrusted frame, and what to do with them. Without it a small
    model answers the frame rather than the question, which may be far above the
    results: it repeats the frame's markup or its reminder line. Only the prompt shows
    it, never the response's items."""
    return {"type": "message", "role": "user", "content": ANSWER_REMINDER.format(question)}


def _question(items: list[dict]) -> str | None:
    """The text of the last user message of the input (what file_search also searches)."""
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return item_text(item).strip() or None
    return None


def _missing(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
    )


# The stream's last event when the database did not answer the turn's final write.
UNRECORDED = (
    "the response could not be recorded: the database did not answer; "
    "the server records it once the database is back"
)
# How long a turn's final state is retried while the database does not answer (seconds).
RECORD_RETRY_S = 600.0


class ResponseService:
    def __init__(
        self,
        engine: EngineClient,
        store: Store,
        lock: ConversationLock,
        tools: ToolRegistry | None = None,
        default_tools: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.store = store
        self.tools = tools if tools is not None else builtin_tools()
        self.default_tools = default_tools
        self.context = ContextBuilder(engine.tokenizer, engine.max_model_len)
        self.running: dict[str, Turn] = {}
        self.lock = lock  # one turn at a time per conversation, shared with conversations

        # The vector stores file_search reads (set by Product.open), or why there are none.
        self.file_search: FileSearchBackend | None = None
        self.file_search_unavailable = "file_search needs vector stores, which this server lacks"
        # Final states being retried while the database does not answer (`record_later`).
        self.recording: set[asyncio.Task] = set()

    def record_later(self, writes) -> None:
        """Run `writes` (a coroutine) in the background, held until done."""
        task = asyncio.ensure_future(writes)
        self.recording.add(task)
        task.add_done_callback(self.recording.discard)

    async def stop_recording(self) -> None:
        """Give up the retries (shutdown): a start-up on SQLite marks those responses
        `incomplete`."""
        for task in list(self.recording):
            task.cancel()
        await asyncio.gather(*self.recording, return_exceptions=True)

    async def create(
        self,
        owner: str,
        request: ResponseRequest,
        observer: TokenObserver | None = None,
        budget: Budget | None = None,
    ) -> Turn:
        """Check the request against the store, build the prompt, reserve its tokens from
        `budget` and start the turn."""
        if request.conversation_id is not None and not request.store:
            raise InvalidRequestError(
                "a response in a conversation must be stored "
                "(store cannot be false with conversation)",
                "store",
            )
        conversation = request.conversation_id
        if conversation is None:
            return await self._start(owner, request, observer, budget)
        await self.lock.claim(owner, conversation)  # the turn releases it when it ends
        try:
            return await self._start(owner, request, observer, budget)
        except BaseException:
            await self.lock.release(owner, conversation)
            raise

    async def _start(
        self,
        owner: str,
        request: ResponseRequest,
        observer: TokenObserver | None,
        budget: Budget | None,
    ) -> Turn:
        history = await self._history(owner, request)
        _check_call_outputs(history.items, request.input)
        input_items = [stored_item(i) for i in request.input]
        params = dataclasses.replace(
            _sampling_params(request),
            cache_salt=cache_salt(owner),
            output_kind=RequestOutputKind.DELTA,  # the turn streams what is new
        )
        tools = self._resolve_tools(request)
        await self._add_file_search(owner, request, tools)
        declared = [
            FunctionTool(d["name"], d.get("description"), d.get("parameters"), d.get("strict"))
            for d in tools.declarations
        ]
        _check_tool_choice(request.tool_choice, declared)
        config = request.tool_config(declared)
        # A bad schema is the client's error, before any output (in a thread: see `_model_turn`).
        await asyncio.to_thread(_structure, request, config, tools)
        _check_json_mention(request, history)
        shown, _ = _prompt_input(history.items, input_items, [], [], config)
        prompt = self.context.build(
            request.instructions,
            history,
            shown,
            config,
            request.max_output_tokens,
            truncate=request.truncation == "auto",
        )
        budget = budget or _Unlimited()
        await budget.reserve(
            output_budget(
                len(prompt.token_ids), request.max_output_tokens, self.engine.max_model_len
            )
        )
        turn = Turn(
            self,
            owner,
            request,
            history,
            input_items,
            tools,
            prompt,
            params,
            observer or _NoObserver(),
            budget,
        )
        self.running[turn.id] = turn
        return turn

    def _resolve_tools(self, request: ResponseRequest) -> ResolvedTools:
        """The request's tools sorted into built-ins and client functions; a built-in this
        server cannot run is a 400 naming its `tools[i]` entry. file_search is added by
        `_add_file_search`."""
        declared = [t.as_dict() for t in request.tools if not isinstance(t, FileSearchTool)]
        try:
            return self.tools.resolve(declared, self.default_tools)
        except ToolUnavailable as exc:
            message = str(exc)
            raise InvalidRequestError(message, param=message.split(":", 1)[0]) from None

    async def _add_file_search(
        self, owner: str, request: ResponseRequest, tools: ResolvedTools
    ) -> None:
        """The request's file_search, made for `owner`: each vector store must be theirs
        (404 naming it otherwise, as for a store that does not exist) and not expired
        (400); declaring it is a use of it (its `last_active_at` moves)."""
        for i, tool in enumerate(request.tools):
            if not isinstance(tool, FileSearchTool):
                continue
            param = f"tools[{i}]"
            if self.file_search is None:
                raise InvalidRequestError(f"{param}: {self.file_search_unavailable}", param)
            for vector_store_id in tool.vector_store_ids:
                try:
                    await self.file_search.use(owner, vector_store_id)
                except (NotFoundError, InvalidRequestError) as exc:
                    raise type(exc)(exc.message, f"{param}.vector_store_ids", exc.code) from None
            search = FileSearch(
                self.file_search,
                owner,
                tool,
                _question(request.input),
                include_results="file_search_call.results" in request.include,
                text_budget=min(12_000, self.context.max_model_len),
                special_tokens=self.engine.tokenizer.all_special_tokens,
            )
            tools.builtins[FILE_SEARCH] = search
            tools.declarations.append(
                {
                    "type": "function",
                    "name": FILE_SEARCH,
                    "description": search.description,
                    "parameters": search.parameters,
                    "strict": True,
                }
            )

    async def _history(self, owner: str, request: ResponseRequest) -> History:
        if request.previous_response_id is not None:
            found = await self.store.call(
                Repository.response_history, owner, request.previous_response_id
            )
            if found is None:
                raise NotFoundError(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            status, history = found
            if status == "in_progress":
                raise InvalidRequestError(
                    "the previous response is still in progress", "previous_response_id"
                )
            return history
        if request.conversation_id is not None:
            await self.lock.check_others(owner, request.conversation_id, "conversation")
            history = await self.store.call(
                Repository.conversation_history, owner, request.conversation_id
            )
            if history is None:
                raise NotFoundError(
                    f"Conversation with id '{request.conversation_id}' not found.",
                    param="conversation",
                    code="not_found",
                )
            return history
        return History([], None)

    def _live(self, owner: str, response_id: str) -> Turn | None:
        """The owner's turn still running under that id, if it is stored: a `store: false`
        response does not exist for the API (GET, cancel and DELETE answer 404 and leave
        it running), as it will not once it has ended."""
        turn = self.running.get(response_id)
        if turn is None or turn.owner != owner or not turn.request.store:
            return None
        return turn

    async def retrieve(self, owner: str, response_id: str) -> dict:
        turn = self._live(owner, response_id)
        if turn is not None:
            return copy.deepcopy(turn.events.response)
        body = await self.store.call(Repository.get_response, owner, response_id)
        if body is None:
            raise _missing(response_id)
        return body

    async def cancel(self, owner: str, response_id: str) -> dict:
        """Stop a response still being generated; cancelling a cancelled one is a no-op."""
        turn = self._live(owner, response_id)
        if turn is not None:
            turn.stop("cancelled")
            return copy.deepcopy(await turn.wait())
        body = await self.retrieve(owner, response_id)
        if body["status"] == "in_progress":
            raise InvalidRequestError(
                "this response is being generated by another server sharing this database "
                "(or was cut off by one that stopped); only that server can cancel it",
                code="response_not_cancellable",
            )
        if body["status"] != "cancelled":
            raise InvalidRequestError(
                f"only an in-progress response can be cancelled; this one is {body['status']}",
                param="response_id",
            )
        return body

    async def delete(self, owner: str, response_id: str) -> dict:
        turn = self._live(owner, response_id)
        if turn is not None:
            turn.stop("cancelled")
            await turn.wait()
        if not await self.store.call(Repository.delete_response, owner, response_id):
            raise _missing(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(self, owner: str, response_id: str, page: Page) -> dict:
        found = await self.store.call(Repository.list_input_items, owner, response_id, page)
        if found is None:
            raise _missing(response_id)
        return item_list(found)


def _check_call_outputs(history: list[dict], input_items: list[dict]) -> None:
    """Calls and outputs must pair up, as OpenAI requires: each function_call_output
    answers a function call made before it (in the history or earlier in the input), and
    each call the history left unanswered (a client's function, the previous turn's end)
    gets its output in this input. Either way the model would otherwise read a tool
    result nothing asked for, or a call whose result never came."""
    calls = {item["call_id"] for item in history if item["type"] == "function_call"}
    answered = {item["call_id"] for item in history if item["type"] == "function_call_output"}
    waiting = calls - answered
    for item in input_items:
        if item["type"] == "function_call":
            calls.add(item["call_id"])
        elif item["type"] == "function_call_output":
            if item["call_id"] not in calls:
                raise InvalidRequestError(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    "input",
                )
            waiting.discard(item["call_id"])
    if waiting:
        raise InvalidRequestError(
            f"No tool output found for function call {sorted(waiting)[0]}.", "input"
        )
