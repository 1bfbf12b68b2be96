"""One response being generated: a `Turn`, started by `ResponseService.create`.

A turn runs as its own task, apart from the HTTP request that started it: it records
the response as `in_progress` (its writes: `TurnRecorder`, orchestrator/turn_recorder.py),
or `queued` while a background one waits for its place in the server's queue (`Place`),
feeds the engine's tokens through the tool-call parser into `ResponseEvents`, and
records the final state once generation ends, however it ends: completed, cut by
max_output_tokens, cancelled, or stopped because the client went away (then
`incomplete`, with the text generated so far). Because the final write
happens in the turn's own task, a client that disconnects cannot interrupt it. The
final event is sent only after that write commits, so a client that saw
`response.completed` can always read the response back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from types import MappingProxyType

from engine import SamplingParams
from engine.client import EngineClient
from engine.errors import (
    ContextLengthExceededError,
    EngineError,
    EngineShutdownError,
    EngineStoppedError,
)
from orchestrator.agent import (
    CODE_INTERPRETER,
    ITEM_TOOLS,
    Agent,
    code_interpreter_as_function_items,
    file_search_as_function_items,
)
from orchestrator.citations import file_citations
from orchestrator.context import ContextBuilder, Prompt, ToolConfig
from orchestrator.conversation_lock import ConversationLock
from orchestrator.errors import (
    InvalidRequestError,
    ProductError,
    QuotaExceededError,
    RateLimitError,
)
from orchestrator.event_log import EventLog
from orchestrator.events import Event, ResponseEvents, usage
from orchestrator.ids import new_id
from orchestrator.logprobs import TextLogprobs, TokenNames
from orchestrator.response_request import ResponseRequest, function_tools, later_tool_choice
from orchestrator.store import History, Store
from orchestrator.store import knowledge as kb
from orchestrator.tool_parser import ChoiceAssembler, Content, ParsedCall, first_call_function
from orchestrator.tools import ResolvedTools
from orchestrator.tools.code_interpreter import CodeInterpreter
from orchestrator.tools.file_search import FILE_SEARCH, FileSearch
from orchestrator.turn_hooks import Budget, Place, TokenObserver, output_budget
from orchestrator.turn_prompt import model_turn_structure, prompt_input, shows_tool_items
from orchestrator.turn_recorder import TurnRecorder

log = logging.getLogger("tokenmill")

# The stream's last event when the database did not answer the turn's final write.
UNRECORDED = (
    "the response could not be recorded: the database did not answer; "
    "the server records it once the database is back"
)


# Fields the Open Responses spec requires on every response object, at the values a
# request that leaves them out runs with (the service tier is the one this server has).
# A request's own values replace them (`new_response`); a response stored before they
# were recorded reads with these (`ResponseService.retrieve`).
RESPONSE_DEFAULTS = MappingProxyType(
    {
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "prompt_cache_key": None,
        "prompt_cache_retention": None,
        "reasoning": None,
        "safety_identifier": None,
        "service_tier": "default",
        "top_logprobs": 0,
    }
)


def new_response(request: ResponseRequest, status: str) -> dict:
    """The response object as the request starts it: `status` (`in_progress`, or
    `queued`), with no output yet, and the request's settings echoed."""
    return {
        **RESPONSE_DEFAULTS,
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),  # whole seconds, as OpenAI gives them
        "status": status,
        "background": request.background,
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
        "text": _text_config(request),
        "tool_choice": request.tool_choice,
        "tools": [t.as_dict() for t in request.tools],
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation,
        "usage": None,
        "user": request.user,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "prompt_cache_key": request.prompt_cache_key,
        "prompt_cache_retention": request.prompt_cache_retention,
        "safety_identifier": request.safety_identifier,
        "top_logprobs": request.top_logprobs,
    }


def _text_config(request: ResponseRequest) -> dict:
    """The response's `text`: its format, and its verbosity when the request gave one."""
    text = {"format": request.text_format}
    return text if request.verbosity is None else {**text, "verbosity": request.verbosity}


@dataclass(frozen=True)
class TurnServices:
    """What a turn uses of the server that runs it, handed in by `ResponseService` so the
    turn depends on these pieces alone, not on the service that starts it."""

    engine: EngineClient
    context: ContextBuilder  # builds each later generation's prompt
    store: Store  # where a stored response is recorded
    lock: ConversationLock  # released when a conversation's turn ends
    running: dict[str, Turn]  # the server's running turns, which the turn leaves as it ends
    record_later: Callable[[Coroutine], None]  # retries a final write in the background
    token_names: TokenNames  # how output_text logprobs name tokens


@dataclass(frozen=True)
class PreparedTurn:
    """A request checked against the store and ready to run, as `ResponseService` hands it
    to a `Turn`: everything a client's mistake could fail on has been worked out before
    the turn starts, so a bad request is a 4xx and never a failed response."""

    owner: str
    request: ResponseRequest
    history: History  # what the request continues (previous response or conversation)
    input_items: list[dict]  # the request's input, as the store keeps items
    tools: ResolvedTools
    prompt: Prompt  # the first generation's (its tokens reserved before the turn starts)
    params: SamplingParams  # the request's, streaming deltas, with the owner's cache salt


@dataclass
class _Progress:
    """What one engine generation has gathered so far."""

    assembler: ChoiceAssembler
    logprobs: TextLogprobs | None  # None: the request did not ask for them
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0
    # Tokens the engine generated past `output_ids` before an abort stopped it: they
    # are counted in the usage (computed, so billed), but are in no output.
    unseen: int = 0

    def on_abort(self, unseen: int, cached: int) -> None:
        """The generation was stopped before its end: no finished output reports its
        prompt's cache hit, the engine's abort does."""
        self.unseen += unseen
        self.cached = cached


@dataclass
class _Totals:
    """Token counts over all of a turn's generations, and the latest prompt + output
    (what the next response's prompt extends) with the history items it left out."""

    history_start: int
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
    the stream's. A turn given a `place` that is queued starts `queued` and runs once the
    place is its."""

    def __init__(
        self,
        services: TurnServices,
        prepared: PreparedTurn,
        observer: TokenObserver,
        budget: Budget,
        place: Place | None = None,
        recorded: dict | None = None,
    ) -> None:
        """`recorded`: the response as `ResponseService` already wrote it, `in_progress`
        or `queued` with its input items (`ResponseService._record_given_images`); None:
        the turn makes it and writes it beside its run."""
        self.services = services
        self.owner = prepared.owner
        self.request = prepared.request
        self.history = prepared.history
        self.input_items = prepared.input_items
        self.tools = prepared.tools
        self.declared = function_tools(self.tools.declarations)
        self.prompt: Prompt | None = prepared.prompt  # the first generation's
        self.params = prepared.params
        self.observer = observer
        self.budget = budget
        self.place = place
        queued = place is not None and place.queued
        self.events = ResponseEvents(
            recorded or new_response(self.request, "queued" if queued else "in_progress")
        )
        self.id: str = self.events.response["id"]
        code = self.tools.builtins.get(CodeInterpreter.name)
        if isinstance(code, CodeInterpreter) and self.request.store:
            self.tools.builtins[CodeInterpreter.name] = code.keeping(self._hold_storage)
        self.totals = _Totals(self.history.start)
        # The generation running now: its prompt length and progress (`_usage_so_far`).
        self._running: tuple[int, _Progress] | None = None
        self._generations = 0
        self._code_calls: list[dict] = []  # code_interpreter/file_search calls of the turn
        self._agent: Agent | None = None
        # A background response's events are kept for readers resuming its stream.
        self.log = EventLog(keep=self.request.background)
        self._stop_status: str | None = None
        self._recorder = TurnRecorder(
            services.store if self.request.store else None,
            services.record_later,
            self.owner,
            self.events,
            self.input_items,
            budget,
            self._usage_so_far,
        )
        self._consumer: asyncio.Task | None = None
        self._recorder.begin(written=recorded is not None)
        self._task = asyncio.create_task(self._run())

    async def _hold_storage(self, item_id: str, size: int) -> None:
        """Hold the owner's storage that a code_interpreter run's images take in this
        stored response (`knowledge.hold_storage`)."""
        now = int(time.time())
        await self.services.store.call(kb.hold_storage, self.owner, self.id, item_id, size, now)

    def stream(self, after: int = -1) -> AsyncIterator[Event]:
        """The events whose sequence_number is above `after`, until the turn ends (any
        number of readers for a background response, one otherwise: `EventLog`)."""
        return self.log.follow(after)

    async def begun(self) -> None:
        """Wait until the response's `in_progress` row is written (when it is stored): a
        background response's create answers only then, so the id it gives survives a
        crash and reads on every server sharing the database. A failed write is not
        raised here: the turn writes its start again as it records its end."""
        await self._recorder.begun()

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
            self.log.put(event)

    async def _run(self) -> None:
        try:
            self._put(self.events.start())
            status, reason, error = await self._take_place() or await self._generate()
            await self._recorder.stop_checkpoints()
            totals = self.totals
            final = self.events.finish(
                status,
                usage(totals.input_tokens, totals.output_tokens, totals.cached),
                int(time.time()),
                reason,
                error,
                annotate=self._annotate,
            )
            tokens = None if status == "failed" else totals.context_tokens
            recorded = await self._recorder.finish(tokens, self._history_start_item())
            await self._settle(status)
            self._put(final if recorded else [self.events.error(UNRECORDED)])
        except Exception:
            log.exception("response %s could not be completed", self.id)
            self._put([self.events.error("the response could not be recorded")])
        finally:
            await self._recorder.stop_checkpoints()
            if self.request.conversation_id is not None:
                await self.services.lock.release(self.owner, self.request.conversation_id)
            await self._settle("failed")  # a no-op when settled above
            self.log.close()
            self.services.running.pop(self.id, None)
            self.observer.on_finished()

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

    async def _settle(self, status: str) -> None:
        totals = self.totals
        await self.budget.settle(status, totals.input_tokens, totals.cached, totals.output_tokens)

    async def _take_place(self) -> tuple[str, None, None] | None:
        """Wait for the turn's place, when it has one (in a task of its own, which `stop`
        cancels): a queued turn is `in_progress` once it has it. Returns the status the
        turn ends with when stopped meanwhile, without having run."""
        if self.place is None:
            return None
        if self._stop_status is not None:  # stopped before its task began
            return self._stop_status, None, None
        self._consumer = asyncio.create_task(self.place.wait())
        try:
            await self._consumer
        except asyncio.CancelledError:
            if self._stop_status is None:
                raise  # the turn itself is being cancelled (shutdown)
            return self._stop_status, None, None
        self._consumer = None
        if self.events.response["status"] == "queued":
            self._put(self.events.leave_queue())
            await self._recorder.leave_queue()
        return None

    async def _generate(self) -> tuple[str, str | None, dict | None]:
        """Run the agent loop; returns (status, incomplete reason, error).

        The loop runs in a task of its own, which `stop` cancels: a stopped turn ends at
        once even if the engine has no further output to deliver or a tool is running."""
        if self._stop_status is not None:  # stopped as it left the queue
            return self._stop_status, None, None
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
        except ContextLengthExceededError as exc:  # the engine's own check, at submission
            return "failed", None, {"code": "invalid_prompt", "message": str(exc)}
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
        names = [t.name for t in config.callable]
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
        shown, after_results = prompt_input(
            self.history.items, self.input_items, made, self._prompt_items(made), config
        )
        shows_calls = shows_tool_items([*self.history.items, *shown])
        # The answer-after-results rules were measured on models that only read the default
        # tool prompt; a template with its own tool section keeps its chained calls.
        after_results = after_results and not self.services.context.native_tools
        structure = model_turn_structure(
            self.request, config, self.tools, shows_calls, after_results
        )
        params = dataclasses.replace(self.params, max_tokens=left, structured_outputs=structure)
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            return prompt, params
        totals = self.totals
        history = History(self.history.items, totals.context_tokens, totals.history_start)
        prompt = self.services.context.build(
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
        config = self._turn_config(tools_enabled)
        if self._generations == 0 and self._search_forced(config):
            return self._forced_search()
        # In a thread: a large text.format schema's grammar, and a long history's prompt,
        # take up to a second to build, which the event loop's other streams need not wait for.
        prompt, params = await asyncio.to_thread(self._next_prompt, items, config)
        request_id = self.id if self._generations == 0 else f"{self.id}-{self._generations}"
        await self._reserve_later(prompt, params)
        self._generations += 1
        start = len(self.events.output)
        self._code_calls = []
        names = [t.name for t in config.callable]  # built-ins declared as functions too
        forced = first_call_function(config.mode, config.forced, names)
        progress = _Progress(
            ChoiceAssembler(names, None if config.parallel else 1, forced),
            None
            if params.logprobs is None
            else TextLogprobs(self.services.token_names, params.logprobs),
        )
        await self._generate_once(progress, prompt, params, request_id)
        if progress.finish_reason != "stop":
            raise self._cut(progress.finish_reason, start)
        return self._new_items(start)

    def _turn_config(self, tools_enabled: bool) -> ToolConfig:
        """The tools this generation is offered and how it must use them: none once the
        search or the forced call is done (`_searched_enough`, `_forced_call_made`), and
        tool_choice "auto" after the first generation (within the allowed tools)."""
        request = self.request
        if self._generations > 0:  # a forced or required call was made: now free to answer
            request = dataclasses.replace(
                request, tool_choice=later_tool_choice(request.tool_choice)
            )
        offered = tools_enabled and not (self._searched_enough() or self._forced_call_made())
        return request.tool_config(self.declared if offered else [])

    def _forced_search(self) -> list[dict]:
        """The file_search call a forced first generation would have written
        (`_search_forced`), made without one."""
        self._generations += 1
        self.prompt = None  # the first prompt asked for the call this replaces
        return [_item_call(FILE_SEARCH, '{"queries": []}')]

    async def _reserve_later(self, prompt: Prompt, params: SamplingParams) -> None:
        """Reserve a later generation's prompt and output beside what the earlier ones
        spent; the first was reserved before the turn started (`ResponseService._reserve`)."""
        if self._generations == 0:
            return
        await self.budget.reserve(
            output_budget(
                len(prompt.token_ids), params.max_tokens, self.services.engine.max_model_len
            ),
            spent=self.totals.input_tokens + self.totals.output_tokens,
        )

    async def _generate_once(
        self, progress: _Progress, prompt: Prompt, params: SamplingParams, request_id: str
    ) -> None:
        """Consume the generation into `progress` and count it however it ends: one stopped
        before its end (the turn stopped, an error) is aborted in the engine, and the text
        the parser held back is emitted."""
        self._running = (len(prompt.token_ids), progress)
        computed = True
        try:
            await self._consume(progress, prompt.token_ids, params, request_id)
        except (ValueError, EngineStoppedError):
            # The engine's refusal at submission (its only ValueError, before any output),
            # or its having shut down by then: it computed none of the prompt, which is
            # therefore not charged.
            computed = bool(progress.output_ids)
            raise
        finally:
            self._running = None
            self._add_to_totals(prompt, progress, computed)
            if progress.finish_reason is None:
                await self.services.engine.abort(request_id)
            if progress.finish_reason in (None, "abort"):
                self._emit(progress, progress.assembler.push("", final=True))  # the text held back

    def _add_to_totals(self, prompt: Prompt, progress: _Progress, computed: bool) -> None:
        """Count a generation's tokens (its prompt's only when the engine `computed` it),
        and keep its prompt + output and where its history started for the next
        response's prompt to extend."""
        totals = self.totals
        totals.input_tokens += len(prompt.token_ids) if computed else 0
        totals.output_tokens += len(progress.output_ids) + progress.unseen
        totals.cached += progress.cached
        totals.context_tokens = prompt.token_ids + progress.output_ids
        totals.history_start = prompt.dropped_items

    def _history_start_item(self) -> str | None:
        """The id of the item the last prompt started its history at (None: it kept the
        whole history), recorded for the next turn, whose history is this one's with this
        turn's input and output appended (the item is one of those when the prompt kept
        none of the history). An id, so deleting earlier items does not move the start."""
        start = self.totals.history_start
        after = [*self.history.items, *self.input_items, *self.events.output][start:]
        return after[0]["id"] if start and after else None

    def _cut(self, finish_reason: str | None, start: int) -> _Cut:
        """The end of a generation that did not finish its answer. Cut by max_output_tokens,
        the built-in calls it wrote (from output index `start`) stay in the response, as
        not run."""
        reason = "max_output_tokens" if finish_reason == "length" else None
        if reason is not None and self._agent is not None:
            builtin = [
                item
                for item in self.events.output[start:]
                if item["type"] == "function_call"
                and item["name"] in self.tools.builtins
                and item["status"] == "completed"
            ]
            why = f"this response reached {reason}"
            self._agent.not_run([*builtin, *self._code_calls], why)
        return _Cut(reason)

    def _new_items(self, start: int) -> list[dict]:
        """Close the generation's message and take its items (from output index `start`) back
        out of the output list for the agent, with the built-in item calls it made."""
        self._put(self.events.close_message(self._annotate))
        new = self.events.output[start:]
        del self.events.output[start:]
        return [*new, *self._code_calls]

    async def _consume(
        self, progress: _Progress, prompt: list[int], params: SamplingParams, request_id: str
    ) -> None:
        outputs = self.services.engine.generate(prompt, params, request_id, progress.on_abort)
        async with aclosing(outputs):
            async for out in outputs:
                for o in out.outputs:
                    progress.output_ids += o.token_ids
                    self.observer.on_tokens(len(o.token_ids))
                    progress.finish_reason = o.finish_reason or progress.finish_reason
                    if progress.logprobs is not None:
                        progress.logprobs.add(o.logprobs or [])
                    self._emit(progress, progress.assembler.push_delta(o.text, o.finish_reason))
                if out.finished:
                    progress.cached = out.num_cached_tokens
                if progress.assembler.repeated:
                    # A call repeated an earlier one: the turn's calls are made, and the
                    # model's further output is dropped (`ChoiceAssembler`); the tokens
                    # it made meanwhile are counted by on_abort as the stream closes.
                    await self.services.engine.abort(request_id)
                    progress.finish_reason = "stop"
                    return

    def _emit(self, progress: _Progress, pieces: list) -> None:
        """Text (with the logprobs of the tokens that wrote it, when asked for) and whole
        calls become events; a call's streamed pieces (`CallStart`, `ArgumentsDelta`) are
        not needed here, since its `ParsedCall` carries it all. A code_interpreter or
        file_search call is not streamed as a function call: the agent turns it into a
        code_interpreter_call or file_search_call item, with events of its own."""
        for piece in pieces:
            if isinstance(piece, Content):
                logprobs = progress.logprobs
                end = piece.start + len(piece)
                taken = None if logprobs is None else logprobs.take(piece.start, end)
                self._put(self.events.text(piece, taken))
            elif isinstance(piece, ParsedCall) and (
                piece.name in ITEM_TOOLS and piece.name in self.tools.builtins
            ):
                self._put(self.events.close_message())
                self._code_calls.append(_item_call(piece.name, piece.arguments))
            elif isinstance(piece, ParsedCall):
                self._put(self.events.function_call(piece))


def _item_call(name: str, arguments: str) -> dict:
    """A completed function_call of a built-in that has items of its own (code_interpreter,
    file_search): handed to the agent, which makes it that item, and never streamed."""
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "call_id": new_id("call"),
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _turn_error(code: str, exc: ProductError) -> dict:
    """A failed response's `error` for a refusal after its turn started: `code` is the
    closest of OpenAI's codes for a response (the SDK's ResponseError.code, which has no
    `insufficient_quota` or `context_length_exceeded`), and the message starts with the
    refusal's own code, which says the cause."""
    cause = exc.code or "invalid_request"
    message = exc.message if cause == code else f"{cause}: {exc.message}"
    return {"code": code, "message": message}
