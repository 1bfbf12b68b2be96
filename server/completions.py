"""POST /v1/completions: raw prompts (text or token ids, one or a batch), no template."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive

from engine import RequestOutput
from engine.outputs import num_output_tokens
from orchestrator.accounts import Meter
from orchestrator.chat_types import CompletionRequest
from orchestrator.turn_hooks import output_budget
from server.generation import (
    Collected,
    ResponseHeader,
    beam_search_params,
    check_params_vocabulary,
    engine_outputs,
    make_sampling_params,
    merge,
    respond,
    usage,
)
from server.logprobs import completion_logprobs, echoed_prompt, logprob_names, prompt_logprobs
from server.metrics import RequestTimer
from server.prompt_prep import prepare_prompts
from server.sse import DONE, event
from server.state import ServerState
from server.structured import completion_structured_outputs


@dataclass
class CompletionRun:
    state: ServerState
    request: CompletionRequest
    header: ResponseHeader
    n: int
    prompt_texts: list[str]  # for echo

    def logprobs(self, entries: list, offset: int) -> dict | None:
        if self.request.logprobs is None:
            return None
        names = logprob_names(self.state.token_names, self.request.return_tokens_as_token_ids)
        return completion_logprobs(entries, names, self.request.logprobs, offset)

    def first_logprobs(
        self, index: int, scored: RequestOutput | None, entries: list
    ) -> dict | None:
        """A choice's logprobs from its start: with echo, the prompt's tokens come first
        (from the text's start), then the generated ones."""
        if not self.request.echo or scored is None:
            return self.logprobs(entries, len(self.echo_text(index)))
        return self.logprobs([*echoed_prompt(scored), *entries], 0)

    def echo_text(self, choice_index: int) -> str:
        return self.prompt_texts[choice_index // self.n] if self.request.echo else ""

    def token_ids(self, prompt_ids: list[int] | None, token_ids: list[int]) -> dict:
        """With return_token_ids, vLLM's fields of a choice (or of its chunk): its prompt's
        token ids (`prompt_ids`: in a stream, on the choice's first chunk only) and the
        tokens it generated (an echoed prompt is not among them)."""
        if not self.request.return_token_ids:
            return {}
        ids = {"token_ids": token_ids}
        return ids if prompt_ids is None else {"prompt_token_ids": prompt_ids, **ids}


async def create_completion(
    state: ServerState,
    request: CompletionRequest,
    receive: Receive,
    timer: RequestTimer,
    meter: Meter,
    fair_share: str | None = None,
) -> Response:
    """Take a place (`fair_share`: the user whose share of the engine it takes), tokenize
    and check the prompts, wait for the place to be admitted, reserve the tokens on
    `meter`, then generate; `meter` is finished on every way out. The checks come before
    the wait, as in chat.py."""
    model = state.resolve_model(request.model)
    meter.model = model
    # In a thread, off the event loop: see the same call in chat.py.
    structure = await asyncio.to_thread(completion_structured_outputs, request)
    params = make_sampling_params({**request.sampling, "structured_outputs": structure})
    check_params_vocabulary(params, state.engine.vocab_size)
    run_params = params
    if request.use_beam_search:
        run_params = beam_search_params(params, request.length_penalty)
    sequences = len(request.prompts) * params.n
    ticket = state.admission.enter(
        sequences, "prompt" if len(request.prompts) > 1 else "n", fair_share
    )
    try:
        size = sum(len(p) for p in request.prompts)
        # A scored prompt (max_tokens 0) may fill the window: the token the engine samples
        # after it is dropped, and never takes a position.
        prompts, texts = await state.prepare(
            size,
            prepare_prompts,
            request.prompts,
            request.echo,
            params.max_tokens,
            params.truncate_prompt_tokens,
            request.add_special_tokens,
        )
        await ticket.wait_while_connected(receive)
        max_len = state.engine.max_model_len
        await meter.reserve(
            sum(output_budget(len(ids), params.max_tokens, max_len, params.n) for ids in prompts)
        )
        engine_id = f"cmpl-{uuid.uuid4().hex}"
        header = ResponseHeader(
            engine_id if request.request_id is None else f"cmpl-{request.request_id}", model
        )
        run = CompletionRun(state, request, header, params.n, texts)
        timers = [timer] + [RequestTimer(state.metrics, arrival=timer.arrival) for _ in prompts[1:]]
        outputs = merge(
            [
                engine_outputs(state, ids, run_params, f"{engine_id}-{i}", t, meter)
                for i, (ids, t) in enumerate(zip(prompts, timers, strict=True))
            ]
        )
    except BaseException:
        ticket.release()
        raise
    return await respond(
        outputs,
        params.n,
        request.stream,
        lambda outputs: _completion_events(run, outputs),
        lambda collected: _completion_response(run, collected),
        ticket,
        meter,
        receive,
    )


def _prompt_logprobs(run: CompletionRun, collected: Collected) -> dict[int, list] | None:
    """Per prompt position, vLLM's `prompt_logprobs` (each of the prompt's n choices
    carries them, as in vLLM); None when not asked for."""
    top_n = run.request.prompt_logprobs
    if top_n is None:
        return None
    names = run.state.token_names
    return {p: prompt_logprobs(out, names, top_n) for p, out in collected.scored_prompts.items()}


def _completion_response(run: CompletionRun, collected: Collected) -> dict:
    choices = []
    scored = _prompt_logprobs(run, collected)
    for index, c in sorted(collected.choices.items()):
        echo = run.echo_text(index)
        choice = {
            "index": index,
            "text": echo + c.text,
            "logprobs": run.first_logprobs(
                index, collected.scored_prompts.get(index // run.n), c.logprobs
            ),
            "finish_reason": c.finish_reason,
        }
        if scored is not None:
            choice["prompt_logprobs"] = scored[index // run.n]
        choice |= run.token_ids(collected.prompt_token_ids[index // run.n], c.token_ids)
        choices.append(choice)
    totals = usage(collected.prompt_tokens, collected.completion_tokens, collected.cached_tokens)
    return run.header.body("text_completion", choices, usage=totals)


def _chunk(run: CompletionRun, choices: list[dict], totals: dict | None = None) -> bytes:
    extra = {"usage": totals} if run.request.include_usage else {}
    return event(run.header.body("text_completion", choices, **extra))


async def _completion_events(
    run: CompletionRun, outputs: AsyncGenerator[tuple[int, RequestOutput], None]
) -> AsyncGenerator[bytes, None]:
    offsets: dict[int, int] = {}  # per choice: characters sent so far, for text_offset
    prompt_tokens = completion_tokens = cached_tokens = 0
    seen_prompts: set[int] = set()
    scored_prompts: dict[int, RequestOutput] = {}  # the outputs with prompt logprobs
    async with aclosing(outputs):
        async for position, out in outputs:
            if position not in seen_prompts:
                seen_prompts.add(position)
                prompt_tokens += len(out.prompt_token_ids)
            if out.finished:
                cached_tokens += out.num_cached_tokens
            if out.prompt_logprobs is not None:
                scored_prompts[position] = out
            completion_tokens += num_output_tokens(out)
            totals = None  # vLLM's continuous usage stats: the usage so far
            if run.request.continuous_usage:
                totals = usage(prompt_tokens, completion_tokens, cached_tokens)
            for o in out.outputs:
                index = position * run.n + o.index
                entries = o.logprobs or []
                prompt_ids = None
                if index in offsets:
                    text, logprobs = o.text, run.logprobs(entries, offsets[index])
                else:  # the choice's first chunk: with echo, the prompt too
                    text = run.echo_text(index) + o.text
                    logprobs = run.first_logprobs(index, scored_prompts.get(position), entries)
                    prompt_ids = out.prompt_token_ids
                offsets[index] = offsets.get(index, len(text) - len(o.text)) + len(o.text)
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": o.finish_reason,
                }
                yield _chunk(run, [choice | run.token_ids(prompt_ids, o.token_ids)], totals)
    if run.request.include_usage:
        yield _chunk(run, [], usage(prompt_tokens, completion_tokens, cached_tokens))
    yield DONE
