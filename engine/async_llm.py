"""Streaming API for servers: `async for out in engine.generate(...)`.

The engine steps in a background thread so the event loop never waits on a forward
pass. The two threads talk through an inbox (adds and aborts, applied between
steps) and per-request asyncio queues fed with `call_soon_threadsafe`. Every yield
is a delta: only the text and tokens produced since the previous one.

The engine is also built in that thread, so it is the only one in the process that ever
runs a multi-threaded torch op. Each thread that does gets its own OpenMP worker team, and
once a process has more OpenMP threads than cores, libgomp stops spinning between parallel
regions: on two cores, loading on the caller's thread and stepping on another made decode
steps 60% slower. Once built, the team is pinned one thread per CPU when it fills them
(`EngineArgs.pin_threads`, engine/thread_pinning.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from engine.args import EngineArgs
from engine.beam_search import BeamSearch, BeamSearchParams, request_output, step_params
from engine.errors import (
    BatchFailedError,
    EngineError,
    EngineShutdownError,
    EngineStoppedError,
    RequestFailedError,
)
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput, merge_output, num_output_tokens
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.sequence import Request
from engine.thread_pinning import pin_openmp_team

log = logging.getLogger("tokenmill")

# Consecutive failed steps after which the engine is taken to be broken, not unlucky.
MAX_FAILED_STEPS = 3
# An idle engine gathering a burst waits at most this many `burst_wait_ms` in all.
MAX_BURST_WAITS = 6


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Spent:
    """What a beam search's requests generated so far, and its prompt's prefix-cache hit
    (its first step's, when the prompt alone was the request)."""

    generated: int = 0
    cached: int = 0
    first: bool = True

    def add(self, out: RequestOutput) -> None:
        self.aborted(num_output_tokens(out), out.num_cached_tokens)

    def aborted(self, tokens: int, cached: int) -> None:
        self.generated += tokens
        if self.first:
            self.cached, self.first = cached, False


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | Exception]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


class AsyncLLM:
    def __init__(self, args: EngineArgs | None = None, **engine_options) -> None:
        args = args or EngineArgs(**engine_options)
        self._inbox: queue.SimpleQueue[tuple[str, Request | str]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        # The running beam searches (touched on event loops only): each one's id -> its
        # step's request ids.
        self._searches: dict[str, list[str]] = {}
        self._wake = threading.Event()
        self._args = args
        self._stopped = threading.Event()
        # Why the engine loop died, if it did; read by servers' health checks.
        self.failure: BaseException | None = None
        built: queue.SimpleQueue[LLMEngine | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(args, built), name="tokenmill-engine", daemon=True
        )
        self._thread.start()
        engine = built.get()
        if isinstance(engine, BaseException):
            self._thread.join()
            raise engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.model_name = engine.args.model

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        on_abort: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes, as `params.output_kind` says: all so
        far each time (the default, as vLLM), only what is new (DELTA, what the server
        streams), or only the finished request. Raises ValueError for a bad request,
        EngineStoppedError when submitted to an engine already shut down (neither has
        computed any of it) and EngineError if the engine failed. Closing the iterator
        early (a client that went away) aborts the request and frees its blocks;
        `on_abort` is then called, before the close returns, with the number of output
        tokens the engine generated that no yielded output carried (those it made while
        the caller was not reading, up to the abort): they were computed, so a server
        meters them; and with the prompt's prefix-cache hit (`num_cached_tokens`), which
        the caller would otherwise take from the finished output it never gets (0 for a
        request aborted before admission)."""
        if self.failure is not None:
            raise EngineError(f"the engine failed: {self.failure!r}")
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is shut down")
        if params.structured_outputs is None:
            request = self.engine.make_request(request_id, prompt, params)
        else:  # a large schema's matcher takes up to a second: not on the event loop
            request = await asyncio.to_thread(self.engine.make_request, request_id, prompt, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        if self._stopped.is_set():  # the loop ended after the check above: nobody would answer
            del self._streams[request_id]
            raise EngineStoppedError("the engine is shut down")
        self._send("add", request)
        finished = False
        kind = params.output_kind
        so_far: RequestOutput | None = None  # received, and (but for FINAL_ONLY) yielded
        cached = 0  # the prompt's prefix-cache hit, as the latest output received says
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished, cached = item.finished, item.num_cached_tokens
                if kind is RequestOutputKind.DELTA:
                    yield item
                    continue
                so_far = merge_output(so_far, item)
                if finished or kind is RequestOutputKind.CUMULATIVE:
                    yield _snapshot(so_far)
        finally:
            if not finished:
                self._send("abort", request_id)
                if on_abort is not None:
                    held = so_far if kind is RequestOutputKind.FINAL_ONLY else None
                    unseen, cached = await _drain(stream.queue, cached)
                    on_abort(num_output_tokens(held) + unseen, cached)

    async def beam_search(
        self,
        prompt: str | list[int],
        params: BeamSearchParams,
        request_id: str,
        on_abort: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's beam search (engine/beam_search.py, as `LLM.beam_search`) as one request:
        each step, every live beam is an engine request (`{request_id}-{step}-{beam}`),
        batched with the engine's other work. Yields once, when the search ends, as vLLM's
        server-side search does: the best `beam_width` beams as completions, best first,
        with `num_generated_tokens` (every token the search generated, those of dropped
        beams included) and the prompt's prefix-cache hit. Raises as `generate` does (an
        EngineStoppedError only from its first step: a later step's is the shutdown's
        EngineShutdownError, as the steps before it were computed).
        `abort(request_id)` ends it after the step under way, whose requests it aborts: it
        yields the best beams so far, those still live finished with "abort". Closing the
        iterator early, or cancelling its task, aborts the step's requests too; whenever
        the search ends without its result (closed, or failed), `on_abort` gets the tokens
        it generated and the prompt's cache hit, as `generate`'s does, for a server to
        meter the compute spent."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        token_ids = self.engine.tokenize(prompt)
        if request_id in self._searches or request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        eos = self.engine.outputs.eos_token_ids
        search = BeamSearch.start(token_ids, params, eos, self.max_model_len)
        step = dataclasses.replace(step_params(params), output_kind=RequestOutputKind.FINAL_ONLY)
        spent = _Spent()
        result: RequestOutput | None = None
        self._searches[request_id] = []
        try:
            while beams := search.next_beams():
                ids = [f"{request_id}-{search.steps}-{i}" for i in range(len(beams))]
                self._searches[request_id] = ids
                try:
                    outputs = await self._run_step([b.tokens for b in beams], step, ids, spent)
                except EngineStoppedError:
                    if search.steps == 0:
                        raise  # none of the search was computed
                    raise EngineShutdownError("the engine was shut down") from None
                if request_id not in self._searches:  # aborted: the outputs are cut
                    break
                search.advance([out.outputs[0].logprobs[0] for out in outputs])
            aborted = request_id not in self._searches
            result = request_output(
                request_id,
                prompt if isinstance(prompt, str) else None,
                token_ids,
                search.best("abort" if aborted else "length"),
                None if self.tokenizer is None else self._decode_output,
                spent.cached,
                spent.generated,
            )
        finally:
            self._searches.pop(request_id, None)
            if result is None and on_abort is not None:
                on_abort(spent.generated, spent.cached)
        yield result

    async def _run_step(
        self, prompts: list[list[int]], params: SamplingParams, ids: list[str], spent: _Spent
    ) -> list[RequestOutput]:
        """A beam search step's requests, run together; the outputs in order. Leaving early
        (a failure, a cancellation) cancels the others, which aborts them."""

        async def final(prompt: list[int], request_id: str) -> RequestOutput:
            [out] = [o async for o in self.generate(prompt, params, request_id, spent.aborted)]
            spent.add(out)
            return out

        tasks = [asyncio.ensure_future(final(p, i)) for p, i in zip(prompts, ids, strict=True)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _decode_output(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def abort(self, request_id: str) -> None:
        """Stop a request, or a beam search's step requests; their blocks are freed before
        the next step runs."""
        for step_id in self._searches.pop(request_id, ()):
            self._send("abort", step_id)
        self._send("abort", request_id)

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (cheap; safe from any thread)."""
        return self._stats

    async def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    # -- engine thread ------------------------------------------------------------------

    def _send(self, kind: str, payload: Request | str) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _run(self, args: EngineArgs, built: queue.SimpleQueue) -> None:
        try:
            self.engine = LLMEngine(args)
        except BaseException as exc:  # handed to the constructor, which re-raises it
            built.put(exc)
            return
        if args.pin_threads and self.engine.device.type == "cpu":
            pin_openmp_team(torch.get_num_threads())
        self._stats = self.engine.stats()
        built.put(self.engine)
        try:
            self._loop()
        except BaseException as exc:
            log.critical("the engine loop failed; no request can be served", exc_info=True)
            self.failure = exc
            self._stopped.set()
            self._fail_all(EngineError(f"the engine failed: {exc!r}"))
            return
        self._fail_all(EngineShutdownError("the engine was shut down"))

    def _loop(self) -> None:
        failed_steps = 0
        while not self._stopped.is_set():
            was_idle = not self.engine.has_unfinished_requests()
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            if was_idle:
                self._gather_burst()
            try:
                outputs = self.engine.step()
            except BatchFailedError as exc:
                failed_steps += 1
                if failed_steps >= MAX_FAILED_STEPS:
                    raise
                log.exception("engine step failed; ending the requests of its batch")
                self._fail_requests(exc.request_ids, exc)
                continue
            failed_steps = 0
            self._deliver(outputs)
            self._stats = self.engine.stats()

    def _gather_burst(self) -> None:
        """Take in the rest of a burst before the first step after idling.

        Clients that each send their next request when the last one ends (a chat product's
        users after a broadcast, a benchmark's closed loop) make bursts; their requests
        reach the engine over some milliseconds, as the event loop parses each. Stepping
        at the first arrival prefills it alone and the rest a step later, two prefills
        instead of one, with the second behind the first: measured through the server
        (16 streams, docs/performance.md), a wave's prefill took 0.1 s longer that way.
        Waiting while requests keep arriving costs a lone request one `burst_wait_ms`.
        """
        gap = self._args.burst_wait_ms / 1000
        deadline = time.monotonic() + MAX_BURST_WAITS * gap
        while not self._stopped.is_set() and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            if self._inbox.empty() and not self._wake.wait(timeout=min(gap, left)):
                return
            self._drain_inbox()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs over with one wake-up per event loop, not one per request:
        at 32 streams that is 31 fewer self-pipe writes and callbacks per step."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            item = out if out.error is None else out.error
            batches.setdefault(stream.loop, []).append((stream.queue, item))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.enqueue(payload)
                except ValueError as exc:
                    self._finish_stream(payload.request_id, exc)
                except Exception as exc:
                    log.exception("request %s failed on entering the engine", payload.request_id)
                    self.engine.abort_request(payload.request_id)
                    self._finish_stream(
                        payload.request_id,
                        RequestFailedError(
                            f"request {payload.request_id} failed in the engine: {exc!r}"
                        ),
                    )
            else:
                out = self.engine.abort_request(payload)
                if out is not None:
                    self._finish_stream(payload, out)

    def _finish_stream(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(item)

    def _fail_requests(self, request_ids: set[str], error: EngineError) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            self._finish_stream(request_id, error)

    def _fail_all(self, error: EngineError) -> None:
        """End every request with a clear error instead of leaving it hanging. Each
        request is ended on its own, so a broken engine cannot keep any stream waiting."""
        for request_id in list(self.engine.requests):
            with contextlib.suppress(Exception):
                self.engine.abort_request(request_id)
        for request_id in list(self._streams):
            self._finish_stream(request_id, error)


async def _drain(queue_: asyncio.Queue, cached: int) -> tuple[int, int]:
    """The output tokens still to come on an aborted request's queue: up to its last
    item, which the engine always sends (the abort's output, the finished request's, or
    an error), whether the request was still running or had ended unread; and the
    prompt's prefix-cache hit as the latest of them says (`cached`, the one known
    before, if none does)."""
    tokens = 0
    while True:
        item = await queue_.get()
        if isinstance(item, Exception):
            return tokens, cached
        tokens, cached = tokens + num_output_tokens(item), item.num_cached_tokens
        if item.finished:
            return tokens, cached


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy of an accumulating output that later merges leave as it is."""
    outputs = [
        dataclasses.replace(
            o,
            token_ids=list(o.token_ids),
            logprobs=None if o.logprobs is None else list(o.logprobs),
        )
        for o in output.outputs
    ]
    return dataclasses.replace(output, outputs=outputs)
