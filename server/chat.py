"""POST /v1/chat/completions: prompt building, then OpenAI-shaped responses or chunks."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace

from starlette.responses import Response
from starlette.types import Receive

from engine import CompletionOutput, RequestOutput, SamplingParams
from engine.outputs import num_output_tokens
from orchestrator.accounts import Meter
from orchestrator.chat_prompt import active_tools
from orchestrator.chat_types import ChatRequest
from orchestrator.tool_parser import (
    ArgumentsDelta,
    CallEvent,
    CallStart,
    ChoiceAssembler,
    ParsedCall,
    ends_cut,
    first_call_function,
)
from orchestrator.turn_hooks import output_budget
from server.generation import (
    ChoiceResult,
    Collected,
    Outputs,
    ResponseHeader,
    beam_search_params,
    check_params_vocabulary,
    engine_outputs,
    make_sampling_params,
    merge,
    respond,
    usage,
)
from server.logprobs import chat_logprobs, logprob_names, prompt_logprobs
from server.metrics import RequestTimer
from server.prompt_prep import check_context, encode_chat_prompt, prompt_chars
from server.sse import DONE, event
from server.state import ServerState
from server.structured import chat_structured_outputs


@dataclass
class ChatRun:
    """What every response piece of one request shares."""

    state: ServerState
    request: ChatRequest
    header: ResponseHeader
    tool_names: list[str]
    prompt_tokens: int

    @property
    def max_calls(self) -> int | None:
        return None if self.request.parallel_tool_calls else 1

    def assembler(self) -> ChoiceAssembler:
        request = self.request
        forced = first_call_function(request.tool_choice, request.forced_tool, self.tool_names)
        return ChoiceAssembler(self.tool_names, self.max_calls, forced)

    def logprobs(self, entries: list) -> dict | None:
        if not self.request.logprobs:
            return None
        names = logprob_names(self.state.token_names, self.request.return_tokens_as_token_ids)
        return chat_logprobs(entries, names, self.request.top_logprobs)


async def create_chat_completion(
    state: ServerState,
    request: ChatRequest,
    receive: Receive,
    timer: RequestTimer,
    meter: Meter,
    fair_share: str | None = None,
) -> Response:
    """Take a place (`fair_share`: the user whose share of the engine it takes), tokenize
    and check the prompt, wait for the place to be admitted, reserve the tokens on
    `meter`, then generate; `meter` is finished on every way out. The checks come before
    the wait: a client's mistake is answered at once however full the user's share."""
    model = state.resolve_model(request.model)
    meter.model = model
    tools = active_tools(request)
    # Building a grammar takes up to a second for a large schema; llguidance releases the
    # GIL meanwhile, so in a thread it leaves the event loop to the other streams.
    native_tools = state.prompt_context.native_tools
    structure = await asyncio.to_thread(chat_structured_outputs, request, tools, native_tools)
    params = make_sampling_params({**request.sampling, "structured_outputs": structure})
    check_params_vocabulary(params, state.engine.vocab_size)
    ticket = state.admission.enter(params.n, "n", fair_share)
    try:
        prompt_ids = await state.prepare(
            _prompt_size(request), encode_chat_prompt, request, params.truncate_prompt_tokens
        )
        params = _default_max_tokens(state, params, len(prompt_ids))
        run_params = params
        if request.use_beam_search:
            run_params = beam_search_params(params, request.length_penalty)
        max_len = state.engine.max_model_len
        check_context(len(prompt_ids), params.max_tokens, max_len, "messages")
        await ticket.wait_while_connected(receive)
        await meter.reserve(output_budget(len(prompt_ids), params.max_tokens, max_len, params.n))
        engine_id = f"chatcmpl-{uuid.uuid4().hex}"
        header = ResponseHeader(
            engine_id if request.request_id is None else f"chatcmpl-{request.request_id}", model
        )
        run = ChatRun(state, request, header, [t.name for t in tools], len(prompt_ids))
        outputs = merge([engine_outputs(state, prompt_ids, run_params, engine_id, timer, meter)])
        if tools and not request.use_beam_search:
            outputs = _until_calls_repeat(run, outputs, params.n)
    except BaseException:
        ticket.release()
        raise
    return await respond(
        outputs,
        params.n,
        request.stream,
        lambda outputs: _chat_events(run, outputs),
        lambda collected: _chat_response(run, collected),
        ticket,
        meter,
        receive,
    )


async def _until_calls_repeat(run: ChatRun, outputs: Outputs, n: int) -> Outputs:
    """`outputs`, ended once each of the `n` choices has finished or written a call that
    repeats an earlier call of its own, which ends it (`ChoiceAssembler.repeated`: the
    repeat and all after it are dropped): closing `outputs` then aborts the engine's
    request, and each choice so ended gets a last, empty delta with finish reason "stop".
    Forced to call with parallel calls on, the default 135M model otherwise writes the
    same call until max_tokens runs out. The choices' text is parsed here as well as
    where it is answered; a choice's deltas are few tokens each."""
    assemblers = {i: run.assembler() for i in range(n)}
    finished: set[int] = set()
    async with aclosing(outputs):
        async for position, out in outputs:
            yield position, out
            for o in out.outputs:
                assemblers[o.index].push_delta(o.text, o.finish_reason, o.stop_reason)
                if o.finish_reason is not None:
                    finished.add(o.index)
            ended = {i for i, a in assemblers.items() if a.repeated} - finished
            if ended and not out.finished and len(ended | finished) == n:
                last = [CompletionOutput(i, "", [], "stop") for i in sorted(ended)]
                yield position, replace(out, outputs=last, finished=True, prompt_logprobs=None)
                return


def _prompt_size(request: ChatRequest) -> int:
    """`prompt_chars`, or "too many to count here" when even counting would be slow."""
    variables = request.chat_template_kwargs
    if len(request.messages) + len(request.tools) + len(variables) > 64 or any(
        isinstance(v, dict | list) for v in variables.values()
    ):
        return sys.maxsize
    return prompt_chars(request)


def _default_max_tokens(
    state: ServerState, params: SamplingParams, num_prompt: int
) -> SamplingParams:
    """The operator's cap (--max-tokens-default) for a request that names no max_tokens,
    within what the context window leaves: a small model at temperature 1 may never emit
    its end token, and without a cap would generate until the window is full."""
    cap = state.config.max_tokens_default
    room = state.engine.max_model_len - num_prompt
    if params.max_tokens is not None or cap is None or room < 1:
        return params
    return replace(params, max_tokens=min(cap, room))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _chat_choice(run: ChatRun, index: int, result: ChoiceResult) -> dict:
    assembler = run.assembler()
    pieces = assembler.push(
        result.text, final=True, cut=ends_cut(result.finish_reason, result.stop_reason)
    )
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    content = "".join(p for p in pieces if isinstance(p, str))
    message: dict = {
        "role": "assistant",
        "content": content or None if assembler.began_calls else content,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = [
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in calls
        ]
    choice = {
        "index": index,
        "message": message,
        "logprobs": run.logprobs(result.logprobs),
        "finish_reason": _finish_reason(assembler, result.finish_reason),
    }
    if run.request.return_token_ids:
        choice["token_ids"] = result.token_ids
    return choice


def _finish_reason(assembler: ChoiceAssembler, engine_reason: str | None) -> str | None:
    """ "tool_calls" when the turn made calls and none was cut short; else the engine's
    reason ("length", or "stop" for a stop string inside a call's arguments)."""
    return "tool_calls" if assembler.calls_complete else engine_reason


def _chat_response(run: ChatRun, collected: Collected) -> dict:
    choices = [_chat_choice(run, i, c) for i, c in sorted(collected.choices.items())]
    totals = usage(run.prompt_tokens, collected.completion_tokens, collected.cached_tokens)
    top_n = run.request.prompt_logprobs
    extra = {}
    # vLLM's, on the response: a chat request has one prompt
    if top_n is not None:
        scored = collected.scored_prompts[0]
        extra["prompt_logprobs"] = prompt_logprobs(scored, run.state.token_names, top_n)
    if run.request.return_token_ids:
        extra["prompt_token_ids"] = collected.prompt_token_ids[0]
    return run.header.body("chat.completion", choices, usage=totals, **extra)


# -- streaming -----------------------------------------------------------------------------


def _chunk(run: ChatRun, choices: list[dict], totals: dict | None = None, **extra: object) -> bytes:
    if run.request.include_usage:
        extra["usage"] = totals
    return event(run.header.body("chat.completion.chunk", choices, **extra))


def _stream_choice(
    index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None
) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class _StreamChoice:
    assembler: ChoiceAssembler
    started: bool = False  # its role has been sent

    @property
    def may_call(self) -> bool:
        return self.assembler.parser is not None

    def carrier(self) -> dict:
        """The delta of a chunk that only carries its tokens' logprobs or ids, their text
        showing nothing yet: empty content in a choice that cannot call tools; no content
        where the text is held back as a possible call's start, as it may be none."""
        return {} if self.may_call else {"content": ""}

    def role_pieces(self, index: int, pieces: list[dict]) -> list[dict]:
        """The role, on a choice's first chunk, as OpenAI sends it: beside the first
        call's head with `"content": null` when the choice begins with a call; else in a
        chunk of its own, with empty content before text (or an empty answer) and null
        content before anything else. A choice that cannot call tools sends it at once;
        one that may waits for its first piece, its text being held back meanwhile."""
        if self.started or (self.may_call and not pieces):
            return []
        self.started = True
        if not self.may_call or not pieces:
            return [_stream_choice(index, {"role": "assistant", "content": ""})]
        first = pieces[0]
        if _is_call_head(first["delta"]):
            first["delta"] = {"role": "assistant", "content": None, **first["delta"]}
            return []
        empty_answer = first["finish_reason"] is not None and not self.assembler.began_calls
        text = "" if first["delta"].get("content") or empty_answer else None
        return [_stream_choice(index, {"role": "assistant", "content": text})]


def _is_call_head(delta: dict) -> bool:
    return "id" in delta.get("tool_calls", [{}])[0]


def _call_head(name: str, call_index: int) -> dict:
    """OpenAI's streaming shape: id, type and name once, then the arguments in pieces."""
    return {
        "tool_calls": [
            {
                "index": call_index,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        ]
    }


def _call_arguments(text: str, call_index: int) -> dict:
    return {"tool_calls": [{"index": call_index, "function": {"arguments": text}}]}


def _call_deltas(event: CallEvent, call_index: int) -> list[dict]:
    """The chunks' deltas for one call event of the call numbered `call_index`."""
    if isinstance(event, CallStart):
        return [_call_head(event.name, call_index)]
    if isinstance(event, ArgumentsDelta):
        return [_call_arguments(event.text, call_index)]
    if event.streamed:  # head and arguments already sent
        return []
    return [_call_head(event.name, call_index), _call_arguments(event.arguments, call_index)]


def _choice_events(
    run: ChatRun, choice: _StreamChoice, out: RequestOutput, o, totals: dict | None
) -> list[bytes]:
    """The chunks for one engine delta `o` of one choice, each with the usage `totals`
    (vLLM's continuous usage stats, else None). Its logprobs ride on its first content
    chunk, its token ids (return_token_ids) on its first chunk after the role; a chunk
    of no text (`_StreamChoice.carrier`) carries them where the delta shows nothing (text
    held back while it may begin a tool call), so every token reaches the client."""
    pieces = []
    calls_before = choice.assembler.num_calls
    logprobs = run.logprobs(o.logprobs or [])
    for piece in choice.assembler.push_delta(o.text, o.finish_reason, o.stop_reason):
        if isinstance(piece, str):
            pieces.append(_stream_choice(o.index, {"content": piece}, logprobs))
            logprobs = None  # they ride on the first content chunk of the delta
        else:
            pieces += [_stream_choice(o.index, d) for d in _call_deltas(piece, calls_before)]
            calls_before += isinstance(piece, ParsedCall)
    if logprobs and logprobs["content"]:
        pieces.append(_stream_choice(o.index, choice.carrier(), logprobs))
    if o.finish_reason is not None:
        reason = _finish_reason(choice.assembler, o.finish_reason)
        pieces.append(_stream_choice(o.index, {}, finish_reason=reason))
    if run.request.return_token_ids:
        if o.token_ids and not pieces:
            pieces.append(_stream_choice(o.index, choice.carrier()))
        if pieces:
            pieces[0]["token_ids"] = o.token_ids
    # The prompt's token ids ride beside the role, as on vLLM's first chunks.
    opening = not choice.started and run.request.return_token_ids
    extra = {"prompt_token_ids": out.prompt_token_ids} if opening else {}
    pieces = choice.role_pieces(o.index, pieces) + pieces
    return [_chunk(run, [p], totals, **(extra if i == 0 else {})) for i, p in enumerate(pieces)]


async def _chat_events(
    run: ChatRun, outputs: AsyncGenerator[tuple[int, RequestOutput], None]
) -> AsyncGenerator[bytes, None]:
    choices: dict[int, _StreamChoice] = {}
    completion_tokens = cached_tokens = 0
    async with aclosing(outputs):
        async for _, out in outputs:
            if out.finished:
                cached_tokens = out.num_cached_tokens
            completion_tokens += num_output_tokens(out)
            totals = None
            if run.request.continuous_usage:
                totals = usage(run.prompt_tokens, completion_tokens, cached_tokens)
            for o in out.outputs:
                choice = choices.setdefault(o.index, _StreamChoice(run.assembler()))
                for chunk in _choice_events(run, choice, out, o, totals):
                    yield chunk
    if run.request.include_usage:
        yield _chunk(run, [], usage(run.prompt_tokens, completion_tokens, cached_tokens))
    yield DONE
