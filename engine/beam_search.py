"""vLLM's beam search (`LLM.beam_search`, `AsyncLLM.beam_search`), built on the engine's
ordinary requests.

Each step, every live beam of every prompt is one request for a single token with the
`2 * beam_width` most likely tokens' logprobs; each of those tokens extends the beam into a
candidate scored by its cumulative logprob over its length to the power `length_penalty`
(the length counts the prompt, as vLLM's does). A candidate that ends in a stop token is
finished; of the rest, the best `beam_width` of the prompt live on. At the end the
finished and the live beams are ranked together and the best `beam_width` returned. A
beam's prompt and earlier tokens are in the prefix cache from the step before, so each
step computes about one token per beam. `BeamSearch` holds one prompt's search; the
offline and the async APIs differ only in how they run a step's requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import TokenLogprobs
from engine.sampling_params import MAX_LOGPROBS, SamplingParams, is_int

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for 2 * beam_width logprobs
# A score divides by the length to this power: beyond it, a long context's power overflows
# a float (or rounds to 0), and the ranking with it.
MAX_LENGTH_PENALTY = 10


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    # Keep the stop token that finished a beam in its tokens and text.
    include_stop_str_in_output: bool = False
    # As SamplingParams': the prefix-cache namespace of the search's requests.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "beam_width": (
                is_int(self.beam_width) and 1 <= self.beam_width <= MAX_BEAM_WIDTH,
                f"an integer in [1, {MAX_BEAM_WIDTH}]",
            ),
            "max_tokens": (is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            "temperature": (_finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            "length_penalty": (
                _finite(self.length_penalty) and abs(self.length_penalty) <= MAX_LENGTH_PENALTY,
                f"a number in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}]",
            ),
            "ignore_eos": (isinstance(self.ignore_eos, bool), "a boolean"),
            "include_stop_str_in_output": (
                isinstance(self.include_stop_str_in_output, bool),
                "a boolean",
            ),
            "cache_salt": (
                self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
                "a non-empty string or None",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` include the prompt, as vLLM's; `logprobs` has the step's
    logprobs (a `{token_id: Logprob}` mapping) for each generated token; `text` (the whole
    sequence, prompt included, as vLLM's) is filled in for the returned beams."""

    tokens: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (a stop token) or "length"
    stop_reason: int | None = None  # the stop token that finished it


@dataclass
class BeamSearchOutput:
    """A prompt's best beams, best first (`beam_width` of them)."""

    sequences: list[BeamSearchSequence]


# Runs a step: each prompt (token ids) as one request under the params, outputs in order.
Generate = Callable[[list[list[int]], SamplingParams], list[RequestOutput]]


def step_params(params: BeamSearchParams) -> SamplingParams:
    """The request each live beam makes at a step: one token, with the `2 * beam_width`
    likeliest tokens' logprobs."""
    return SamplingParams(
        temperature=params.temperature,
        max_tokens=1,
        logprobs=2 * params.beam_width,
        detokenize=False,
        cache_salt=params.cache_salt,
    )


@dataclass
class BeamSearch:
    """One prompt's search, a step at a time: `next_beams()` are the beams the next step
    extends (one engine request each), `advance()` takes those requests' logprobs, and
    `best()` ranks the finished and live beams once no beam is left to extend. The
    offline `beam_search` runs one per prompt in lockstep; `AsyncLLM.beam_search` runs one
    whose requests batch with the engine's other work."""

    params: BeamSearchParams
    stops: set[int]  # the tokens that finish a beam
    max_model_len: int
    live: list[BeamSearchSequence]
    done: list[BeamSearchSequence] = field(default_factory=list)
    steps: int = 0

    @classmethod
    def start(
        cls,
        prompt: list[int],
        params: BeamSearchParams,
        stop_token_ids: Collection[int],
        max_model_len: int,
    ) -> BeamSearch:
        stops = set() if params.ignore_eos else set(stop_token_ids)
        return cls(params, stops, max_model_len, [BeamSearchSequence(tokens=list(prompt))])

    def next_beams(self) -> list[BeamSearchSequence]:
        """The live beams, once a beam that fills the context window has finished (it
        cannot take another token); none after `max_tokens` steps."""
        if self.steps >= self.params.max_tokens:
            return []
        self.done += [b for b in self.live if len(b.tokens) > self.max_model_len]
        self.live = [b for b in self.live if len(b.tokens) <= self.max_model_len]
        return self.live

    def advance(self, logprobs: list[TokenLogprobs]) -> None:
        """Each of `next_beams()`'s step logprobs, in order: every beam extended by each
        of its candidate tokens, the finished ones put aside and the best of the rest
        live on."""
        candidates: list[BeamSearchSequence] = []
        for beam, step in zip(self.live, logprobs, strict=True):
            for seq in _extend(beam, step, self.stops, self.params):
                (self.done if seq.finish_reason else candidates).append(seq)
        self.live = _best(candidates, self.params)
        self.steps += 1

    def best(self, reason: str = "length") -> list[BeamSearchSequence]:
        """The best `beam_width` of the finished and live beams, best first; a beam still
        live finishes with `reason` ("abort": the search was stopped)."""
        best = _best(self.done + self.live, self.params)
        for beam in best:
            beam.finish_reason = beam.finish_reason or reason
        return best


def beam_search(
    generate: Generate,
    prompts: list[list[int]],
    params: BeamSearchParams,
    stop_token_ids: Collection[int],
    max_model_len: int,
    decode: Callable[[list[int]], str] | None,
    use_tqdm: bool = False,
) -> list[BeamSearchOutput]:
    """Each prompt's best `beam_width` sequences; `decode` (None: no tokenizer) gives
    their text. A beam that fills the context window finishes with "length"."""
    step = step_params(params)
    searches = [BeamSearch.start(p, params, stop_token_ids, max_model_len) for p in prompts]
    for _ in tqdm(range(params.max_tokens), desc="beam search", disable=not use_tqdm):
        beams = [search.next_beams() for search in searches]
        batch = [beam.tokens for live in beams for beam in live]
        if not batch:
            break
        outputs = iter(generate(batch, step))
        for search, live in zip(searches, beams, strict=True):
            search.advance([next(outputs).outputs[0].logprobs[0] for _ in live])
    results = []
    for search in searches:
        best = search.best()
        for beam in best:
            beam.text = None if decode is None else decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results


def request_output(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: list[int],
    beams: list[BeamSearchSequence],
    decode: Callable[[list[int]], str] | None,
    num_cached_tokens: int,
    num_generated_tokens: int,
) -> RequestOutput:
    """A finished search as `AsyncLLM.generate`'s final output, as vLLM's server-side
    search gives it: each beam a completion (its generated tokens and their text, with
    `decode`; "" without a tokenizer), best first."""
    outputs = []
    for index, beam in enumerate(beams):
        tokens = beam.tokens[len(prompt_token_ids) :]
        outputs.append(
            CompletionOutput(
                index=index,
                text="" if decode is None else decode(tokens),
                token_ids=tokens,
                finish_reason=beam.finish_reason,
                logprobs=beam.logprobs,
                stop_reason=beam.stop_reason,
            )
        )
    return RequestOutput(
        request_id,
        prompt,
        prompt_token_ids,
        outputs,
        num_cached_tokens=num_cached_tokens,
        finished=True,
        num_generated_tokens=num_generated_tokens,
    )


def _extend(
    beam: BeamSearchSequence,
    logprobs: TokenLogprobs,
    stops: set[int],
    params: BeamSearchParams,
) -> list[BeamSearchSequence]:
    """The beam followed by each token of the step's logprobs (the one sampled and the
    most likely), each with the step's logprobs as that token's (the token, its logprob
    and rank, the step's likeliest): finished with "stop" on a stop token, whose id stays
    in the tokens only with `include_stop_str_in_output`."""
    options = {logprobs.token_id: (logprobs.logprob, logprobs.rank)}
    for rank, (token, logprob) in enumerate(logprobs.top, 1):
        options.setdefault(token, (logprob, rank))
    out = []
    for token, (logprob, rank) in options.items():
        seq = BeamSearchSequence(
            tokens=[*beam.tokens, token],
            logprobs=[*beam.logprobs, TokenLogprobs(token, logprob, logprobs.top, rank)],
            cum_logprob=beam.cum_logprob + logprob,
        )
        if token in stops:
            seq.finish_reason, seq.stop_reason = "stop", token
            if not params.include_stop_str_in_output:
                seq.tokens.pop()
        out.append(seq)
    return out


def _best(beams: list[BeamSearchSequence], params: BeamSearchParams) -> list[BeamSearchSequence]:
    """The `beam_width` best beams by score, best first. A stop token kept in the tokens
    does not count in the length."""

    def score(beam: BeamSearchSequence) -> float:
        kept_stop = beam.stop_reason is not None and params.include_stop_str_in_output
        return beam.cum_logprob / ((len(beam.tokens) - kept_stop) ** params.length_penalty)

    return sorted(beams, key=score, reverse=True)[: params.beam_width]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
