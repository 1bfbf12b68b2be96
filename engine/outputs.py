"""Results handed to users, shaped like vLLM's so code can switch engines."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    From `LLM` it holds the whole completion; from `AsyncLLM`, as
    `SamplingParams.output_kind` says: everything so far (the default, as vLLM's), only
    what is new since the previous yield (DELTA: streams cost O(new tokens); the server's
    choice), or the whole completion once.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        """A method, as vLLM's (whose `RequestOutput.finished` is an attribute, as here)."""
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's sum of the tokens' logprobs (None when logprobs were not asked for)."""
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass
class RequestMetrics:
    """vLLM's per-request timings, as `time.time()` seconds, so benchmark scripts can take
    TTFT as `first_token_time - arrival_time`. `arrival_time` is when the request was made
    (`LLM.generate`, `AsyncLLM.generate`); `first_scheduled_time` when its prompt first ran
    in a step (`time_in_queue` the wait before); `first_token_time` and `last_token_time`
    when the step that produced its first and latest output token ended; `finished_time`
    when it ended. A time not reached yet is None (`last_token_time`: the arrival)."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = False
    # SamplingParams.prompt_logprobs: one entry per prompt token, the first None. A stream
    # of deltas carries it once, in the output of the first generated token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Set (with finished) when the engine had to end this request because it failed there.
    error: Exception | None = None
    # The request's timings when this output was made (a copy, so later steps leave it be).
    metrics: RequestMetrics | None = None
    # A beam search's (`AsyncLLM.beam_search`): every token the engine generated for it,
    # those of the beams it dropped on the way included. None for a request's outputs,
    # whose tokens are all in its completions (`num_output_tokens`).
    num_generated_tokens: int | None = None


@dataclass
class EngineStats:
    """A snapshot for metrics; counters are totals since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # Sequences ended (each of a request's n), by finish reason: "stop", "length", "abort"
    # (a client gone, or a request failed in the engine).
    finished_total: dict[str, int] = field(default_factory=dict)
    # The compiled backend (engine/compilation.py): "off", "compiling" (eager meanwhile),
    # "ready", "failed"
    compile_state: str = "off"
    # The CPU path (engine/cpu_path.py) and the modes in use; empty off CPU
    cpu: dict[str, object] = field(default_factory=dict)


def num_output_tokens(output: RequestOutput | None) -> int:
    """The tokens the engine generated for `output` (a delta, or a beam search's result):
    what a server meters and reports as completion tokens."""
    if output is None:
        return 0
    if output.num_generated_tokens is not None:
        return output.num_generated_tokens
    return sum(len(o.token_ids) for o in output.outputs)


def merge_output(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta output into the accumulated one (changed in place; None: start one)."""
    if acc is None:
        acc = RequestOutput(
            delta.request_id,
            delta.prompt,
            delta.prompt_token_ids,
            num_cached_tokens=delta.num_cached_tokens,
        )
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    by_index = {o.index: o for o in acc.outputs}
    for out in delta.outputs:
        cur = by_index.get(out.index)
        if cur is None:
            cur = by_index[out.index] = CompletionOutput(out.index, "", [], logprobs=None)
        cur.text += out.text
        cur.token_ids += out.token_ids
        if out.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + out.logprobs
        cur.finish_reason = out.finish_reason
        cur.stop_reason = out.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.metrics = delta.metrics
    acc.finished = delta.finished
    return acc
