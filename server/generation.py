"""Running requests on the engine: parameters, context checks, streams and cleanup.

Both endpoints go through `engine_outputs`, which is the one place that maps engine
errors to API errors, feeds the latency metrics, and aborts the engine request if
its consumer stops early (a client that went away), so KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive

from engine import BeamSearchParams, RequestOutput, SamplingParams
from engine.beam_search import MAX_BEAM_WIDTH
from engine.errors import (
    ContextLengthExceededError,
    EngineError,
    EngineShutdownError,
    EngineStoppedError,
    NothingToSampleError,
    RequestFailedError,
)
from engine.outputs import num_output_tokens
from engine.sampling_params import RequestOutputKind
from orchestrator.accounts import Meter
from orchestrator.accounts.identity import cache_salt
from server.disconnect import unless_disconnected
from server.errors import APIError, from_value_error, invalid, shutting_down
from server.json_body import json_response
from server.metrics import RequestTimer
from server.prompt_prep import context_error
from server.sse import DONE, EventStreamResponse
from server.state import ServerState, Ticket

T = TypeVar("T")


def make_sampling_params(sampling: dict) -> SamplingParams:
    try:
        return SamplingParams(**sampling)
    except ValueError as exc:
        raise from_value_error(exc) from None


# The sampling fields a beam search reads (`beam_search_params`); the prompt's truncation
# and the cache salt are applied as for any request.
_BEAM_SEARCH_FIELDS = (
    "n",
    "max_tokens",
    "temperature",
    "ignore_eos",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "cache_salt",
)


def beam_search_params(params: SamplingParams, length_penalty: float) -> BeamSearchParams:
    """vLLM's `use_beam_search`: a search `n` beams wide (the `n` best are the choices),
    `max_tokens` steps at most. It stops only at the model's end tokens and scores by the
    raw logprobs, so every other sampling field sent (stop, seed, penalties, top_p...) is
    a 400 naming it rather than ignored, as are the fields `beam_search_fields` refuses."""
    defaults = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name not in _BEAM_SEARCH_FIELDS and getattr(params, f.name) != getattr(
            defaults, f.name
        ):
            raise invalid(f"{f.name} cannot be combined with use_beam_search", f.name)
    if params.n > MAX_BEAM_WIDTH:
        raise invalid(
            f"n (the beam width, with use_beam_search) must be at most {MAX_BEAM_WIDTH}, "
            f"got {params.n}",
            "n",
        )
    if params.max_tokens is None:
        raise invalid(
            "max_tokens (or max_completion_tokens) is required with use_beam_search: each "
            "token is a step of n requests",
            "max_tokens",
        )
    try:
        return BeamSearchParams(
            beam_width=params.n,
            max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos,
            temperature=params.temperature,
            length_penalty=length_penalty,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
    except ValueError as exc:
        raise from_value_error(exc) from None


def check_params_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """The token ids in a request's sampling parameters, checked before anything is
    reserved or charged: the engine would refuse them only after the prompt was counted."""
    try:
        params.check_vocabulary(vocab_size)
    except ValueError as exc:
        raise from_value_error(exc) from None


async def engine_outputs(
    state: ServerState,
    prompt: list[int],
    params: SamplingParams | BeamSearchParams,
    request_id: str,
    timer: RequestTimer,
    meter: Meter,
) -> AsyncGenerator[RequestOutput, None]:
    """`engine.generate` (or `engine.beam_search`, for BeamSearchParams) with API errors,
    metrics, metering, and abort-on-early-close."""
    finished = False
    meter.on_submit(len(prompt))
    salt = cache_salt(meter.identity.owner, params.cache_salt)
    try:
        # Tokens the engine made that the client never got (it went away) are metered too,
        # and the prompt's cache hit, which no finished output reports then.
        if isinstance(params, BeamSearchParams):
            params = dataclasses.replace(params, cache_salt=salt)
            generation = state.engine.beam_search(prompt, params, request_id, meter.on_aborted)
        else:
            params = dataclasses.replace(
                params, cache_salt=salt, output_kind=RequestOutputKind.DELTA
            )
            generation = state.engine.generate(prompt, params, request_id, meter.on_aborted)
        async with aclosing(generation) as outputs:
            async for out in outputs:
                count = num_output_tokens(out)  # a beam search's: every token it generated
                timer.on_tokens(count)
                meter.on_tokens(count)
                meter.checkpoint_if_due()
                finished = out.finished
                if finished:
                    meter.on_cached(out.num_cached_tokens)
                yield out
    except ContextLengthExceededError as exc:
        meter.on_refused(len(prompt))
        raise context_error(str(exc), "prompt") from None
    except ValueError as exc:  # the engine's refusal at submission: nothing was computed
        meter.on_refused(len(prompt))
        raise from_value_error(exc) from None
    except NothingToSampleError as exc:
        raise invalid(str(exc), None) from None
    except RequestFailedError as exc:  # a bug this request's input found; the engine goes on
        raise APIError(500, str(exc), code="request_failed") from None
    except EngineShutdownError as exc:
        if isinstance(exc, EngineStoppedError):
            meter.on_refused(len(prompt))  # submitted as the engine stopped: never computed
        raise shutting_down(
            "the server shut down before this request finished", code="server_shutdown"
        ) from None
    except EngineError as exc:
        raise APIError(503, f"the engine failed: {exc}", code="engine_error") from None
    finally:
        if finished:
            timer.on_finished()
        else:
            await state.engine.abort(request_id)


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as items arrive, tagged with the stream's position.

    Each stream is drained by its own task; closing the merged stream cancels them,
    which closes (and so aborts) every underlying request.
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(stream) as s:
                async for item in s:
                    queue.put_nowait((i, item))
            queue.put_nowait(None)
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    """One choice accumulated from deltas (the non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Collected:
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    # Per prompt position: the prompt's token ids as the engine ran them (truncated ones
    # included), for usage and return_token_ids.
    prompt_token_ids: dict[int, list[int]] = field(default_factory=dict)
    cached_tokens: int = 0
    # The tokens the engine generated (`num_output_tokens`): the choices' tokens, or every
    # token of a beam search, the dropped beams' included.
    completion_tokens: int = 0
    # Per prompt position: the output that carried its prompt logprobs, if asked for.
    scored_prompts: dict[int, RequestOutput] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_token_ids.values())


# A request's merged generations: (prompt position, delta) pairs, as `merge` yields them.
Outputs = AsyncGenerator[tuple[int, RequestOutput], None]


async def collect(stream: Outputs, n: int) -> Collected:
    """Accumulate (prompt position, delta) pairs into whole choices numbered like OpenAI's."""
    result = Collected()
    async with aclosing(stream):
        async for position, out in stream:
            result.prompt_token_ids.setdefault(position, out.prompt_token_ids)
            result.completion_tokens += num_output_tokens(out)
            if out.finished:
                result.cached_tokens += out.num_cached_tokens
            if out.prompt_logprobs is not None:
                result.scored_prompts[position] = out
            for o in out.outputs:
                choice = result.choices.setdefault(position * n + o.index, ChoiceResult())
                choice.text += o.text
                choice.token_ids += o.token_ids
                choice.logprobs += o.logprobs or []
                choice.finish_reason = o.finish_reason or choice.finish_reason
                if o.stop_reason is not None:
                    choice.stop_reason = o.stop_reason
    return result


@dataclass
class ResponseHeader:
    """What every response object and chunk of one request repeats: OpenAI clients
    expect the same id and created time on all of them."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, obj: str, choices: list[dict], **extra: object) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }


async def metered_stream(
    stream: AsyncGenerator[bytes, None], meter: Meter
) -> AsyncGenerator[bytes, None]:
    """`stream`, telling `meter` how it ended: its end reached (completed: set before the
    `[DONE]` line goes out, since the client may be gone once it has it), or an error."""
    try:
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.endswith(DONE):
                    meter.outcome = "completed"
                yield chunk
    except APIError as err:
        meter.outcome = meter.error_status(err.status)
        raise


async def respond(
    outputs: Outputs,
    n: int,
    stream: bool,
    events: Callable[[Outputs], AsyncGenerator[bytes, None]],
    body: Callable[[Collected], dict],
    ticket: Ticket,
    meter: Meter,
    receive: Receive,
) -> Response:
    """A generation's answer: its `events` as server-sent events, or, once the engine is
    done, the `body` of what it made, a large one encoded off the event loop. `ticket` is
    released and `meter` finished however it ends; a client gone before a body was ready
    gets none (499)."""
    if stream:

        def close() -> None:
            ticket.release()
            meter.close()

        return EventStreamResponse(metered_stream(events(outputs), meter), on_close=close)
    try:
        collected = await unless_disconnected(receive, lambda: collect(outputs, n))
    finally:
        ticket.release()
    if collected is None:  # the client is gone; nobody will read this
        await meter.finish(meter.stopped_status("incomplete"))
        return Response(status_code=499)
    content = body(collected)
    await meter.finish("completed")
    return await json_response(content)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens is the prefix-cache hit of the prompt."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
