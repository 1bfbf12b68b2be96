"""Results handed to users, shaped like vLLM's so code can switch engines."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    From `LLM` it holds the whole completion; from `AsyncLLM` each yield holds only
    what is new since the previous yield (a delta), so streams cost O(new tokens).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's sum of the tokens' logprobs (None when logprobs were not asked for)."""
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


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
    # The compiled backend (engine/compilation.py): "off", "compiling" (eager meanwhile),
    # "ready", "failed"
    compile_state: str = "off"
    # The CPU path (engine/cpu_path.py) and the modes in use; empty off CPU
    cpu: dict[str, object] = field(default_factory=dict)
