"""The Responses API's operations: create, retrieve (or stream again), cancel, delete and
list input items.

`ResponseService.create` checks a request against the store (its history, the tools it
declares, the vector stores file_search reads), builds the first prompt, reserves its
tokens and starts a `Turn` (orchestrator/turn.py), which generates and records the
response on its own. The other operations read the running turn while one is
generating, else the store. The turns of one conversation run one at a time
(`ConversationLock`, shared with the Conversations API). A background response's turn
runs the same way; its events are kept for clients resuming its stream
(`BackgroundStreams`, orchestrator/background.py), and only it can be cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Collection, Coroutine

from engine import SamplingParams
from engine.client import EngineClient
from engine.sampling_params import RequestOutputKind
from orchestrator.accounts.identity import cache_salt
from orchestrator.background import RETAIN_S, BackgroundStreams
from orchestrator.context import ContextBuilder, Prompt, ToolConfig
from orchestrator.conversation_lock import ConversationLock
from orchestrator.errors import InvalidRequestError, NotFoundError
from orchestrator.events import Event, snapshot
from orchestrator.input_resolver import InputResolver
from orchestrator.items import item_list, readable, stored_item
from orchestrator.logprobs import TokenNames
from orchestrator.response_request import (
    FILE_SEARCH_RESULTS,
    ResponseRequest,
    check_call_outputs,
    check_json_mention,
    check_tool_choice,
    function_tools,
    sampling_params,
)
from orchestrator.store import UNFINISHED, History, Page, Repository, Store
from orchestrator.store.storage_quota import kept_output_bytes
from orchestrator.tools import ResolvedTools, ToolRegistry, ToolUnavailable, builtin_tools
from orchestrator.tools.code_interpreter import CodeInterpreter
from orchestrator.tools.file_search import (
    FILE_SEARCH,
    FileSearch,
    FileSearchBackend,
    FileSearchTool,
)
from orchestrator.turn import RESPONSE_DEFAULTS, PreparedTurn, Turn, TurnServices, new_response
from orchestrator.turn_hooks import (
    Budget,
    NoObserver,
    Place,
    TokenObserver,
    Unlimited,
    output_budget,
)
from orchestrator.turn_prompt import check_turn_structures, prompt_input, user_question


def _missing(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
    )


def _check_cancellable(background: bool) -> None:
    if not background:
        raise InvalidRequestError(
            "only a background response (created with background: true) can be cancelled",
            "response_id",
        )


class ResponseService:
    """The Responses API on one server: its running turns, its tools and the store."""

    def __init__(
        self,
        engine: EngineClient,
        store: Store,
        lock: ConversationLock,
        inputs: InputResolver,
        tools: ToolRegistry | None = None,
        default_tools: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.store = store
        self.inputs = inputs  # reads the files of the input items
        self.tools = tools if tools is not None else builtin_tools()
        self.default_tools = default_tools
        self.context = ContextBuilder(engine.tokenizer, engine.max_model_len)
        self.running: dict[str, Turn] = {}
        self.background = BackgroundStreams()
        self.lock = lock  # one turn at a time per conversation, shared with conversations

        # The vector stores file_search reads (set by Product.open), or why there are none.
        self.file_search: FileSearchBackend | None = None
        self.file_search_unavailable = "file_search needs vector stores, which this server lacks"
        # Final states being retried while the database does not answer (`record_later`).
        self.recording: set[asyncio.Task] = set()
        self.turn_services = TurnServices(
            engine,
            self.context,
            store,
            lock,
            self.running,
            self.record_later,
            TokenNames.cached(engine.tokenizer),
        )

    def record_later(self, writes: Coroutine) -> None:
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
        place: Place | None = None,
    ) -> Turn:
        """Check the request against the store, build the prompt, reserve its tokens from
        `budget` and start the turn. A background turn given a `place` starts `queued`
        until the place is its; any other request waits here for its `place`, after its
        checks (a mistake is answered at once, however long the queue) and before its
        reservation."""
        if request.conversation_id is not None and not request.store:
            raise InvalidRequestError(
                "a response in a conversation must be stored "
                "(store cannot be false with conversation)",
                "store",
            )
        if request.background and not request.store:
            raise InvalidRequestError(
                "a background response must be stored (store cannot be false with background)",
                "background",
            )
        conversation = request.conversation_id
        if conversation is None:
            return await self._start(owner, request, observer, budget, place)
        await self.lock.claim(owner, conversation)  # the turn releases it when it ends
        try:
            await self.lock.check_others(owner, conversation, "conversation")
            return await self._start(owner, request, observer, budget, place)
        except BaseException:
            await self.lock.release(owner, conversation)
            raise

    async def count_input_tokens(self, owner: str, request: ResponseRequest) -> int:
        """The tokens the request's first generation would read: its prompt as `create`
        builds it (instructions, tools, history, input, truncation), with the same 400s
        for a request that could not run, and nothing generated or stored."""
        prepared = await self._prepare(owner, request)
        return len(prepared.prompt.token_ids)

    async def _start(
        self,
        owner: str,
        request: ResponseRequest,
        observer: TokenObserver | None,
        budget: Budget | None,
        place: Place | None,
    ) -> Turn:
        """Prepare the turn, reserve its first generation's tokens and start it."""
        prepared = await self._prepare(owner, request)
        budget = budget or Unlimited()
        if place is not None and not request.background:
            await place.wait()  # its client waits with it: it starts `in_progress`
            place = None
        await self._reserve(budget, prepared)
        recorded = await self._record_given_images(prepared, place)
        turn = Turn(self.turn_services, prepared, observer or NoObserver(), budget, place, recorded)
        self.running[turn.id] = turn
        if request.background:
            self.background.add(owner, turn.id, turn.log)
        return turn

    async def _prepare(self, owner: str, request: ResponseRequest) -> PreparedTurn:
        """Load the history and check the request against it and its tools, in the order
        that decides which 400 a request with several mistakes gets, then build the first
        prompt: a request that cannot run fails here, before it has a response."""
        history = await self._history(owner, request)
        given = await self.inputs.resolve(owner, request.input, "input")
        request = dataclasses.replace(request, input=given)
        check_call_outputs(history.items, request.input)
        input_items = [stored_item(i) for i in request.input]
        params = self._params(owner, request)
        tools = await self._tools(owner, request)
        config = request.tool_config(function_tools(tools.declarations))
        # A bad schema is the client's error, before any output; in a thread, as the turn
        # builds its structures (`Turn._model_turn`): a large schema's grammar takes a while.
        await asyncio.to_thread(check_turn_structures, request, config, tools)
        check_json_mention(request, history)
        prompt = await self._first_prompt(request, history, input_items, config)
        return PreparedTurn(owner, request, history, input_items, tools, prompt, params)

    async def _record_given_images(
        self, prepared: PreparedTurn, place: Place | None
    ) -> dict | None:
        """The response, written before its turn starts when it is stored and its input
        keeps images (code_interpreter calls given back, each stored as a copy of its
        own): their bytes count in the owner's storage quota, checked and held by the
        transaction that writes them (`Repository.begin_response`), so that a request
        they do not fit is refused (a 400, as an upload is) before it has a response.
        None for any other response, which its turn writes beside its run."""
        if not prepared.request.store or not any(map(kept_output_bytes, prepared.input_items)):
            return None
        queued = place is not None and place.queued
        response = new_response(prepared.request, "queued" if queued else "in_progress")
        await self.store.call(
            Repository.begin_response, prepared.owner, response, prepared.input_items
        )
        return response

    @staticmethod
    def _params(owner: str, request: ResponseRequest) -> SamplingParams:
        """The request's sampling parameters, streamed as deltas (the turn streams what is
        new) and salted with the owner's cache salt (no prefix cache shared across users)."""
        return dataclasses.replace(
            sampling_params(request),
            cache_salt=cache_salt(owner),
            output_kind=RequestOutputKind.DELTA,
        )

    async def _tools(self, owner: str, request: ResponseRequest) -> ResolvedTools:
        """The request's tools, file_search made for `owner` and code_interpreter's runs
        queued as `owner`'s, with its tool_choice checked against the functions they
        declare."""
        tools = self._resolve_tools(request)
        code = tools.builtins.get(CodeInterpreter.name)
        if isinstance(code, CodeInterpreter):
            tools.builtins[CodeInterpreter.name] = code.for_owner(owner)
        await self._add_file_search(owner, request, tools)
        check_tool_choice(request.tool_choice, function_tools(tools.declarations))
        return tools

    async def _first_prompt(
        self,
        request: ResponseRequest,
        history: History,
        input_items: list[dict],
        config: ToolConfig,
    ) -> Prompt:
        """The first generation's prompt. In a thread, as the turn's later prompts are
        (`Turn._model_turn`): a long history's renders need not hold up the event loop's
        other streams."""
        shown, _ = prompt_input(history.items, input_items, [], [], config)
        return await asyncio.to_thread(
            self.context.build,
            request.instructions,
            history,
            shown,
            config,
            request.max_output_tokens,
            truncate=request.truncation == "auto",
        )

    async def _reserve(self, budget: Budget, prepared: PreparedTurn) -> None:
        """Reserve the first generation's prompt and output from `budget` (a quota or rate
        limit refuses the request here, before it has a response); the turn reserves its
        later generations itself."""
        await budget.reserve(
            output_budget(
                len(prepared.prompt.token_ids),
                prepared.request.max_output_tokens,
                self.engine.max_model_len,
            )
        )

    def builtin_tools(self) -> list[dict]:
        """The built-in tools this server runs, each with whether it is offered without
        being declared (--default-tools): what a client may let its user turn on (the web
        page's "Run Python code"). The reasons a tool cannot run here stay unsaid."""
        names = [*self.tools.tools, *([FILE_SEARCH] if self.file_search is not None else [])]
        return [{"name": name, "default": name in self.default_tools} for name in sorted(names)]

    def _resolve_tools(self, request: ResponseRequest) -> ResolvedTools:
        """The request's tools sorted into built-ins and client functions; a built-in this
        server cannot run is a 400 naming its `tools[i]` entry. file_search is added by
        `_add_file_search`."""
        try:  # all of them, so that an entry's `tools[i]` is the request's
            return self.tools.resolve([t.as_dict() for t in request.tools], self.default_tools)
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
                user_question(request.input),
                include_results=FILE_SEARCH_RESULTS in request.include,
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
            if status in UNFINISHED:
                raise InvalidRequestError(
                    f"the previous response is still {status.replace('_', ' ')}",
                    "previous_response_id",
                )
            return history
        if request.conversation_id is not None:
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

    async def retrieve(self, owner: str, response_id: str, include: Collection[str] = ()) -> dict:
        """The response as it stands; its output_text logprobs and file_search results
        (kept when its request asked for them) only when `include` asks for them too."""
        turn = self._live(owner, response_id)
        if turn is not None:
            body = snapshot(turn.events.response)
        else:
            body = await self.store.call(Repository.get_response, owner, response_id)
            if body is None:
                raise _missing(response_id)
        readable(body["output"], include)
        return {**RESPONSE_DEFAULTS, **body}  # a body stored without them has them too

    async def stream(self, owner: str, response_id: str, after: int) -> AsyncIterator[Event]:
        """A background response's events from sequence_number `after` + 1: those kept,
        then the rest as they come, until it ends. Checked before the first event: a
        response that is not the owner's is a 404, one that is not background (or whose
        events are no longer kept) a 400."""
        log = self.background.get(owner, response_id)
        if log is not None:
            return log.follow(after)
        body = await self.retrieve(owner, response_id)
        if not body.get("background"):
            raise InvalidRequestError(
                "only a background response (created with background: true) can be streamed "
                "when retrieved",
                "stream",
            )
        raise InvalidRequestError(
            "the events of this response are no longer kept (a background response's "
            f"events are kept in memory by the server that ran it, for {RETAIN_S / 60:.0f} "
            "minutes after it ends); retrieve it without stream",
            "stream",
        )

    async def cancel(self, owner: str, response_id: str) -> dict:
        """Stop a background response still being generated. Cancelling one that has
        ended returns it as it is, as OpenAI does; any other response is a 400. Either
        answer reads the response as a GET without `include` does (no output_text
        logprobs, no file_search results), so it does not depend on whether the turn was
        still running."""
        turn = self._live(owner, response_id)
        if turn is not None:
            _check_cancellable(turn.request.background)
            turn.stop("cancelled")
            body = snapshot(await turn.wait())
            readable(body["output"])
            return body
        body = await self.retrieve(owner, response_id)
        _check_cancellable(body.get("background", False))
        if body["status"] in UNFINISHED:
            raise InvalidRequestError(
                "this response is being generated by another server sharing this database "
                "(or was cut off by one that stopped); only that server can cancel it",
                code="response_not_cancellable",
            )
        return body

    async def delete(self, owner: str, response_id: str) -> dict:
        turn = self._live(owner, response_id)
        if turn is not None:
            turn.stop("cancelled")
            await turn.wait()
        if not await self.store.call(Repository.delete_response, owner, response_id):
            raise _missing(response_id)
        self.background.discard(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(
        self, owner: str, response_id: str, page: Page, include: Collection[str] = ()
    ) -> dict:
        """A page of the response's input items; their output_text logprobs only when
        `include` asks for them, as on every read of items (`readable`)."""
        found = await self.store.call(Repository.list_input_items, owner, response_id, page)
        if found is None:
            raise _missing(response_id)
        readable(found.items, include)
        return item_list(found)
