"""A small stand-in for `engine.AsyncLLM` that follows its public contract.

Tokens are characters (token id = code point), so tests can predict prompts,
counts and outputs exactly. Each request replies with `engine.reply` (text or a
function of the prompt text), honouring max_tokens, stop strings and n, and
streams one token per yield as the real engine does.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from engine.errors import EngineError
from engine.sampler import TokenLogprobs
from tests.server.fake_tokenizer import FakeTokenizer


@dataclass
class FakeEngine:
    reply: str | Callable[[str], str] = "Hello, world!"
    max_model_len: int = 2048
    vocab_size: int = 0x110000  # token id = Unicode code point
    model_name: str = "fake-model"
    failure: BaseException | None = None  # raised by generate(), as a bug in the engine would be
    token_delay: float = 0.0
    # While set (cleared by a test), generation pauses after the first token.
    hold: threading.Event = field(default_factory=threading.Event)
    fail_after: int | None = None  # raise `fail_with` after this many tokens
    fail_with: type[EngineError] = EngineError  # EngineShutdownError: a drain that ran out
    # Tokens "generated" past those a stream closed early had read, reported to its
    # on_abort as AsyncLLM reports the ones it made while nobody read (with the cache hit).
    ahead: int = 0
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    cache_hits: list[int] = field(default_factory=list)  # each request's num_cached_tokens
    generated_total: int = 0
    finished_total: collections.Counter[str] = field(default_factory=collections.Counter)
    num_seqs: dict[str, int] = field(default_factory=dict)  # running requests' n

    def __post_init__(self) -> None:
        self.hold.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.running),
            kv_cache_usage=min(1.0, len(self.running) / 8),
            prompt_tokens_total=sum(len(p) for p in self.prompts),
            generation_tokens_total=self.generated_total,
            finished_total=dict(self.finished_total),
            prefix_cache_queries=sum(len(p) for p in self.prompts),
        )

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)
            self.finished_total["abort"] += self.num_seqs[request_id]

    def _completion(self, prompt: list[int], params: SamplingParams) -> tuple[str, str, str | None]:
        """The reply as the engine would end it: text, finish reason and stop reason (the
        stop string that cut it, as AsyncLLM reports one)."""
        text = self.reply(self.tokenizer.decode(prompt)) if callable(self.reply) else self.reply
        reason, stop_reason = "stop", None
        for stop in params.stop:
            if stop in text:
                text, stop_reason = text[: text.index(stop)], stop
        if params.max_tokens is not None and len(text) > params.max_tokens:
            text, reason, stop_reason = text[: params.max_tokens], "length", None
        return text, reason, stop_reason

    def _cached_tokens(self, prompt: list[int]) -> int:
        """Like a prefix cache with 4-token blocks: the longest earlier shared prefix."""
        best = 0
        for earlier in self.prompts:
            n = 0
            while n < min(len(earlier), len(prompt)) and earlier[n] == prompt[n]:
                n += 1
            best = max(best, n - n % 4)
        return min(best, len(prompt) - 1)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        on_abort: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.failure is not None:
            raise self.failure
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.max_model_len:  # as LLMEngine's
            raise ValueError("prompt too long")
        cached = self._cached_tokens(ids)
        self.prompts.append(ids)
        self.cache_hits.append(cached)
        self.params.append(params)
        self.running.add(request_id)
        self.num_seqs[request_id] = params.n
        text, reason, stop_reason = self._completion(ids, params)
        scored = self._prompt_logprobs(ids, params.prompt_logprobs)
        # Unlike AsyncLLM, closing this generator does not abort: a request stays
        # running until it finishes or the server calls abort(), so tests see whether
        # the server does.
        try:
            for pos in range(max(len(text), 1)):
                if request_id not in self.running:
                    return
                if self.fail_after is not None and pos >= self.fail_after:
                    self.running.discard(request_id)
                    raise self.fail_with("simulated engine failure")
                await asyncio.sleep(self.token_delay)
                while pos == 1 and not self.hold.is_set():
                    await asyncio.sleep(0.005)
                last = pos >= len(text) - 1
                outputs = [
                    self._delta(i, text[pos : pos + 1], last, (reason, stop_reason), params)
                    for i in range(params.n)
                ]
                self.generated_total += params.n * len(text[pos : pos + 1])
                if last:
                    self.running.discard(request_id)
                    self.finished.append(request_id)
                    self.finished_total[reason] += params.n
                yield RequestOutput(
                    request_id,
                    None,
                    ids,
                    outputs,
                    cached,
                    finished=last,
                    prompt_logprobs=scored if pos == 0 else None,
                )
        finally:
            if request_id in self.running and on_abort is not None:  # closed early
                on_abort(self.ahead, cached)

    @staticmethod
    def _prompt_logprobs(ids: list[int], top_n: int | None) -> list[TokenLogprobs | None] | None:
        """As AsyncLLM's, sent with the first output: each prompt token after the first
        scores -1.0, second likeliest after "?" (-0.5), then "!" (-3.0)."""
        if top_n is None:
            return None
        return [None] + [
            TokenLogprobs(t, -1.0, [(ord("?"), -0.5), (t, -1.0), (ord("!"), -3.0)][:top_n], rank=2)
            for t in ids[1:]
        ]

    @staticmethod
    def _delta(
        index: int,
        piece: str,
        last: bool,
        end: tuple[str, str | None],
        params: SamplingParams,
    ) -> CompletionOutput:
        token_ids = [ord(c) for c in piece]
        logprobs = None
        if params.logprobs is not None:
            top = [(t, -0.25) for t in token_ids] + [(ord("?"), -2.0), (ord("!"), -3.0)]
            logprobs = [TokenLogprobs(t, -0.25, top[: params.logprobs]) for t in token_ids]
        reason, stop_reason = end if last else (None, None)
        return CompletionOutput(index, piece, token_ids, reason, logprobs, stop_reason)
