"""Per-request and per-sequence state.

A request with `n` completions owns `n` sequences. Only the first exists until the
prompt is computed; the rest are forked from it then, sharing the prompt's KV blocks
(or, beyond the scheduler's `max_num_seqs`, queued to recompute it). Everything the
scheduler needs is counted in tokens: `num_computed_tokens` says how much of `token_ids`
is already in the KV cache, so a fresh prompt, a chunked prefill, a prefix-cache hit and
a preempted sequence all look alike.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from enum import Enum, auto
from functools import cached_property

import torch

from engine.outputs import RequestMetrics
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class TokenSlice(SequenceABC[int]):
    """A read-only window ``tokens[start:stop]`` on a live token list, without the copy.

    The sampler is handed every running sequence's prompt and output at every step but
    reads them only for penalties; a window keeps that step O(1) per sequence instead of
    O(its length)."""

    __slots__ = ("_start", "_stop", "_tokens")

    def __init__(self, tokens: list[int], start: int, stop: int | None = None) -> None:
        self._tokens, self._start, self._stop = tokens, start, stop

    def __len__(self) -> int:
        stop = len(self._tokens) if self._stop is None else self._stop
        return max(0, stop - self._start)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._tokens, self._start, self._stop)

    def __getitem__(self, index):
        return list(self)[index]


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hit at first admission
    # Structured outputs: the matcher at the start of the output, copied into each sequence.
    grammar: object | None = None
    # params.prompt_logprobs: one entry per prompt token computed so far (the first None:
    # nothing predicts it), and whether the list went out in an output yet.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    # params.bad_words as token sequences (engine.llm_engine tokenizes them).
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    # Its timings, as vLLM's RequestOutput.metrics gives them; arrival: when it was made.
    metrics: RequestMetrics = field(default_factory=lambda: _arrived(time.time()))

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether some prompt token still lacks its logprob: then the prompt is computed in
        full, since a prefix-cache hit skips the positions whose logits give them."""
        done = self.prompt_logprobs
        return done is not None and len(done) < len(self.prompt_token_ids)

    @cached_property
    def cache_offset(self) -> int:
        """What the request's `cache_salt` adds to every token id in the prefix cache's keys
        (0 without one): salted keys fall outside any vocabulary and differ per salt, so
        requests of different salts never match each other's blocks."""
        salt = self.params.cache_salt
        if salt is None:
            return 0
        digest = hashlib.sha256(salt.encode()).digest()
        return (1 + int.from_bytes(digest[:8], "big")) << 32


def _arrived(now: float) -> RequestMetrics:
    return RequestMetrics(arrival_time=now, last_token_time=now)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    pending_forks: int = 0  # siblings to fork once the prompt is computed
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Text streaming state, owned by the output processor.
    detokenizer: object | None = None
    text: str = ""  # decoded text of the output (may include held-back text)
    num_emitted_chars: int = 0  # text[:num_emitted_chars] has been handed out
    num_emitted_tokens: int = 0
    # This sequence's structured-output matcher, following its output (see grammar_matcher).
    grammar: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def cache_key(self, end: int | None = None) -> list[int]:
        """`token_ids[:end]` as the prefix cache keys them (`Request.cache_offset`)."""
        tokens = self.token_ids if end is None else self.token_ids[:end]
        offset = self.request.cache_offset
        return [t + offset for t in tokens] if offset else tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def banned_tokens(self) -> list[int]:
        """The tokens that would complete one of the request's bad words now: a word's last
        token, where the output ends with the word's other tokens."""
        banned = []
        for word in self.request.bad_words_token_ids:
            head = len(word) - 1
            if (
                head <= self.num_output_tokens
                and self.token_ids[self.num_tokens - head :] == word[:-1]
            ):
                banned.append(word[-1])
        return banned

    def grammar_matcher(self):
        """The sequence's structured-output matcher (None if unconstrained), made on first
        use from the request's, so siblings forked later start from the same state."""
        if self.grammar is None and self.request.grammar is not None:
            self.grammar = self.request.grammar.deep_copy()
            self.grammar.consume_tokens(self.output_token_ids)
        return self.grammar
