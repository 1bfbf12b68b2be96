"""vLLM's beam search (`LLM.beam_search`), built on the engine's ordinary requests.

Each step, every live beam of every prompt is one request for a single token with the
`2 * beam_width` most likely tokens' logprobs; each of those tokens extends the beam into a
candidate scored by its cumulative logprob over its length to the power `length_penalty`
(the length counts the prompt, as vLLM's does). A candidate that ends in a stop token is
finished; of the rest, the best `beam_width` of the prompt live on. At the end the
finished and the live beams are ranked together and the best `beam_width` returned. A
beam's prompt and earlier tokens are in the prefix cache from the step before, so each
step computes about one token per beam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from engine.outputs import RequestOutput
from engine.sampler import TokenLogprobs
from engine.sampling_params import MAX_LOGPROBS, SamplingParams, is_int

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for 2 * beam_width logprobs


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

    def __post_init__(self) -> None:
        checks = {
            "beam_width": (
                is_int(self.beam_width) and 1 <= self.beam_width <= MAX_BEAM_WIDTH,
                f"an integer in [1, {MAX_BEAM_WIDTH}]",
            ),
            "max_tokens": (is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            "temperature": (_finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            "length_penalty": (_finite(self.length_penalty), "a finite number"),
            "ignore_eos": (isinstance(self.ignore_eos, bool), "a boolean"),
            "include_stop_str_in_output": (
                isinstance(self.include_stop_str_in_output, bool),
                "a boolean",
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
    step = SamplingParams(
        temperature=params.temperature,
        max_tokens=1,
        logprobs=2 * params.beam_width,
        detokenize=False,
    )
    stops = set() if params.ignore_eos else set(stop_token_ids)
    live = [[BeamSearchSequence(tokens=list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in tqdm(range(params.max_tokens), desc="beam search", disable=not use_tqdm):
        for i, beams in enumerate(live):  # a full window cannot take another token
            done[i] += [b for b in beams if len(b.tokens) > max_model_len]
            live[i] = [b for b in beams if len(b.tokens) <= max_model_len]
        requests = [(i, beam) for i, beams in enumerate(live) for beam in beams]
        if not requests:
            break
        outputs = generate([beam.tokens for _, beam in requests], step)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(requests, outputs, strict=True):
            for seq in _extend(beam, out.outputs[0].logprobs[0], stops, params):
                (done[i] if seq.finish_reason else candidates[i]).append(seq)
        for i, found in enumerate(candidates):
            live[i] = _best(found, params)
    results = []
    for beams, finished in zip(live, done, strict=True):
        best = _best(finished + beams, params)
        for beam in best:
            beam.finish_reason = beam.finish_reason or "length"
            beam.text = None if decode is None else decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results


def _extend(
    beam: BeamSearchSequence,
    logprobs: TokenLogprobs,
    stops: set[int],
    params: BeamSearchParams,
) -> list[BeamSearchSequence]:
    """The beam followed by each token of the step's logprobs (the one sampled and the
    most likely): finished with "stop" on a stop token, whose id stays in the tokens only
    with `include_stop_str_in_output`."""
    options = {logprobs.token_id: logprobs.logprob, **dict(logprobs.top)}
    out = []
    for token, logprob in options.items():
        seq = BeamSearchSequence(
            tokens=[*beam.tokens, token],
            logprobs=[*beam.logprobs, logprobs],
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
