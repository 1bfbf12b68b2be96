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
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from engine import SamplingParams
from engine.errors import EngineError
from engine.structured_output import StructuredOutputsParams
from orchestrator.context import ContextBuilder, Prompt, ToolConfig
from orchestrator.errors import InvalidRequestError, NotFoundError
from orchestrator.events import Event, ResponseEvents, usage
from orchestrator.ids import new_id
from orchestrator.items import item_list, stored_item
from orchestrator.output_structure import ANY_OBJECT, turn_structure
from orchestrator.store import History, Page, Repository, Store
from server.engine_client import EngineClient
from server.protocol import Tool
from server.tool_parser import ChoiceAssembler, ParsedCall

log = logging.getLogger("tokenmill")


@dataclass
class FunctionTool:
    """A client-executed function the model may call (Responses' flat tool shape)."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_dict(self) -> dict:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict}

    def chat_tool(self) -> Tool:
        function = {"name": self.name, "description": self.description,
                    "parameters": self.parameters}
        spec = {k: v for k, v in function.items() if v is not None}
        return Tool(self.name, {"type": "function", "function": spec})


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
    tools: list[FunctionTool] = field(default_factory=list)
    tool_choice: str | dict = "auto"  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True
    # text.format as given: {"type": "text"}, {"type": "json_object"} or
    # {"type": "json_schema", "name", "schema", "strict"[, "description"]}.
    text_format: dict = field(default_factory=lambda: {"type": "text"})

    def format_schema(self) -> dict | None:
        """The JSON schema text.format asks for (None: free text)."""
        kind = self.text_format["type"]
        if kind == "text":
            return None
        return ANY_OBJECT if kind == "json_object" else self.text_format["schema"]

    def tool_config(self) -> ToolConfig:
        choice = self.tool_choice
        mode, forced = ("function", choice["name"]) if isinstance(choice, dict) else (choice,
                                                                                      None)
        if not self.tools:
            mode = "none"
        offered = [t for t in self.tools if mode != "function" or t.name == forced]
        return ToolConfig([t.chat_tool() for t in offered] if mode != "none" else [], mode,
                          forced, self.parallel_tool_calls)


class TokenObserver(Protocol):
    """Latency metrics hook (the server's RequestTimer)."""

    def on_tokens(self, count: int) -> None: ...

    def on_finished(self) -> None: ...


class _NoObserver:
    def on_tokens(self, count: int) -> None:
        pass

    def on_finished(self) -> None:
        pass


def _structure(request: ResponseRequest) -> StructuredOutputsParams | None:
    """The grammar the output must follow: text.format's JSON, and the offered function
    tools' calls (forced by "required" or a named function, lazily triggered by "auto")."""
    config = request.tool_config()
    functions = [(t.name, t.spec["function"].get("parameters")) for t in config.tools]
    return turn_structure(functions, config.mode in ("required", "function"), config.parallel,
                          request.format_schema(), "text.format", "text.format.schema")


def _sampling_params(request: ResponseRequest) -> SamplingParams:
    chosen = {"temperature": request.temperature, "top_p": request.top_p}
    structure = _structure(request)
    try:
        return SamplingParams(max_tokens=request.max_output_tokens,
                              structured_outputs=structure,
                              **{k: v for k, v in chosen.items() if v is not None})
    except ValueError as exc:  # SamplingParams names the field first
        message = str(exc).replace("max_tokens", "max_output_tokens")
        raise InvalidRequestError(message, param=message.split(" ", 1)[0]) from None


def _new_response(request: ResponseRequest) -> dict:
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": time.time(),
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "conversation": {"id": request.conversation_id} if request.conversation_id else None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
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
        "user": None,
    }


@dataclass
class _Progress:
    """What a turn's engine reader has gathered so far."""

    assembler: ChoiceAssembler
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0


class Turn:
    """One response being generated: events flow to `stream()`, the end to `wait()`."""

    def __init__(self, service: ResponseService, owner: str, request: ResponseRequest,
                 input_items: list[dict], prompt: Prompt, params: SamplingParams,
                 observer: TokenObserver) -> None:
        self.service = service
        self.owner = owner
        self.request = request
        self.input_items = input_items
        self.prompt = prompt
        self.params = params
        self.observer = observer
        self.events = ResponseEvents(_new_response(request))
        self.id: str = self.events.response["id"]
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._stop_status: str | None = None
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
        client went away). A no-op once the turn has finished."""
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
            begun = asyncio.create_task(store.call(Repository.begin_response, self.owner,
                                                   snapshot, self.input_items))
        try:
            self._put(self.events.start())
            status, reason, error, output_ids, cached = await self._generate()
            final = self.events.finish(status, usage(len(self.prompt.token_ids),
                                                     len(output_ids), cached),
                                       time.time(), reason, error)
            if store is not None:
                await begun
                tokens = None if status == "failed" else self.prompt.token_ids + output_ids
                await store.call(Repository.finish_response, self.owner, self.events.response,
                                 self.input_items, tokens)
            self._put(final)
        except Exception:
            log.exception("response %s could not be completed", self.id)
            self._put([self.events.error("the response could not be recorded")])
        finally:
            self._queue.put_nowait(None)
            self.service.running.pop(self.id, None)
            self.observer.on_finished()

    async def _generate(self) -> tuple[str, str | None, dict | None, list[int], int]:
        """Run the engine; returns (status, incomplete reason, error, output ids, cached).

        The engine is read by a task of its own, which `stop` cancels: a stopped turn
        ends at once even if the engine has no further output to deliver."""
        config = self.request.tool_config()
        progress = _Progress(ChoiceAssembler([t.name for t in config.tools],
                                             None if config.parallel else 1))
        error = None
        self._consumer = asyncio.create_task(self._consume(progress))
        try:
            await self._consumer
        except asyncio.CancelledError:
            if self._stop_status is None:
                raise  # the turn itself is being cancelled (shutdown)
        except (EngineError, ValueError) as exc:
            error = {"code": "server_error", "message": f"the engine failed: {exc}"}
        finally:
            if progress.finish_reason is None:
                await self.service.engine.abort(self.id)
        reason = progress.finish_reason
        if reason is None or reason == "abort":
            self._emit(progress.assembler.push("", final=True))  # the text held back so far
        result = progress.output_ids, progress.cached
        if error is not None:
            return "failed", None, error, *result
        if self._stop_status is not None:
            return self._stop_status, None, None, *result
        if reason == "length":
            return "incomplete", "max_output_tokens", None, *result
        if reason == "stop":
            return "completed", None, None, *result
        return "incomplete", None, None, *result

    async def _consume(self, progress: _Progress) -> None:
        outputs = self.service.engine.generate(self.prompt.token_ids, self.params, self.id)
        async with aclosing(outputs):
            async for out in outputs:
                for o in out.outputs:
                    progress.output_ids += o.token_ids
                    self.observer.on_tokens(len(o.token_ids))
                    progress.finish_reason = o.finish_reason or progress.finish_reason
                    self._emit(progress.assembler.push(o.text, final=o.finish_reason is not None))
                if out.finished:
                    progress.cached = out.num_cached_tokens

    def _emit(self, pieces: list) -> None:
        """Text and whole calls become events; a call's streamed pieces (`CallStart`,
        `ArgumentsDelta`) are not needed here, since its `ParsedCall` carries it all."""
        for piece in pieces:
            if isinstance(piece, str):
                self._put(self.events.text(piece))
            elif isinstance(piece, ParsedCall):
                self._put(self.events.function_call(piece))


def _missing(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param="response_id",
                         code="not_found")


class ResponseService:
    def __init__(self, engine: EngineClient, store: Store) -> None:
        self.engine = engine
        self.store = store
        self.context = ContextBuilder(engine.tokenizer, engine.max_model_len)
        self.running: dict[str, Turn] = {}

    async def create(self, owner: str, request: ResponseRequest,
                     observer: TokenObserver | None = None) -> Turn:
        """Check the request against the store, build the prompt and start the turn."""
        if request.conversation_id is not None and not request.store:
            raise InvalidRequestError("a response in a conversation must be stored "
                                      "(store cannot be false with conversation)", "store")
        history = await self._history(owner, request)
        input_items = [stored_item(i) for i in request.input]
        params = _sampling_params(request)
        prompt = self.context.build(request.instructions, history, input_items,
                                    request.tool_config(), request.max_output_tokens,
                                    truncate=request.truncation == "auto")
        turn = Turn(self, owner, request, input_items, prompt, params,
                    observer or _NoObserver())
        self.running[turn.id] = turn
        return turn

    async def _history(self, owner: str, request: ResponseRequest) -> History:
        if request.previous_response_id is not None:
            found = await self.store.call(Repository.response_history, owner,
                                          request.previous_response_id)
            if found is None:
                raise NotFoundError(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id", code="previous_response_not_found")
            status, history = found
            if status == "in_progress":
                raise InvalidRequestError("the previous response is still in progress",
                                          "previous_response_id")
            return history
        if request.conversation_id is not None:
            history = await self.store.call(Repository.conversation_history, owner,
                                            request.conversation_id)
            if history is None:
                raise NotFoundError(
                    f"Conversation with id '{request.conversation_id}' not found.",
                    param="conversation", code="not_found")
            return history
        return History([], None)

    def _live(self, owner: str, response_id: str) -> Turn | None:
        turn = self.running.get(response_id)
        return turn if turn is not None and turn.owner == owner else None

    async def retrieve(self, owner: str, response_id: str) -> dict:
        turn = self._live(owner, response_id)
        if turn is not None and turn.request.store:
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
        if body["status"] != "cancelled":
            raise InvalidRequestError(
                f"only an in-progress response can be cancelled; this one is {body['status']}",
                param="response_id")
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
