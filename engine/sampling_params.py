"""Per-request sampling parameters, with vLLM's names, defaults and validation.

The server builds these straight from untrusted JSON, so every check raises
`ValueError` with a message naming the parameter and its allowed range: the
server can turn that into a 400 response without knowing the rules itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

# GuidedDecodingParams is re-exported where vLLM users import it from (vllm.sampling_params).
from engine.structured_output import GuidedDecodingParams as GuidedDecodingParams
from engine.structured_output import StructuredOutputsParams

# Below this temperature sampling is treated as greedy argmax (vLLM uses the same cut-off);
# dividing logits by a temperature this small would only overflow.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
# The sampler applies the repetition penalty to float32 logits: a penalty near float32's
# smallest values rounds to 0 and turns logits into inf and NaN (which then sampled a token
# outside the vocabulary). Far beyond 1 either way it means nothing more, so it is bounded.
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
# torch.Generator.manual_seed's range. The i-th of a request's n completions is seeded with
# seed + i, so seed + n - 1 must stay inside it too.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
ALLOWED_IDS_RULE = "a non-empty list of integers >= 0"
BAD_WORDS_RULE = "a string or a list of strings that are not blank"


class RequestOutputKind(Enum):
    """What `AsyncLLM.generate` yields (vLLM's names): everything so far each time, only
    what is new since the last yield, or only the finished request."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `"temperature": true` in a request is a client bug.
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An integer, not a bool (True is an int to Python, never a token id or a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range, such as a JSON number of 400 digits
        return False


def _as_list(value: object, name: str, rule: str) -> list:
    """A list or tuple as a list; anything else (a number, a dict, a set) is refused rather
    than iterated, so `stop=5` is a clear error instead of a TypeError deep in the engine."""
    if isinstance(value, list | tuple):
        return list(value)
    raise ValueError(f"{name} must be {rule}, got {value!r}")


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop it."""

    n: int = 1
    temperature: float = 1.0  # < GREEDY_TEMPERATURE means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM: prompt and output tokens, divides positive logits
    presence_penalty: float = 0.0  # OpenAI: output tokens only, subtracted once per present token
    frequency_penalty: float = 0.0  # OpenAI: output tokens only, subtracted once per occurrence
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    # None: up to the context window (the engine fills it in). 0: the prompt is scored
    # (prompt_logprobs) and not continued: the output has no token (finish reason "length").
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs, 0..20 (0: only the sampled token's)
    # Logprobs of the prompt's own tokens (each under the model given the tokens before
    # it), with this many top alternatives, as vLLM's; the prompt is then computed in full,
    # never served from the prefix cache.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's: False leaves the output's text empty (token ids only) and skips the work of
    # decoding it; stop strings, which are matched in the text, then cannot be used.
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    # Constrain every output to a structure (JSON schema, regex, choice, grammar).
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's older name for structured_outputs (a GuidedDecodingParams): either, not both.
    guided_decoding: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI)
    # vLLM's: sample only among these token ids (every other token's logit is -inf).
    allowed_token_ids: list[int] | None = None
    # vLLM's: words the output may not contain. Each is tokenized as it starts a text and
    # after a space; the token that would complete one of those sequences is banned.
    bad_words: list[str] | None = None
    # Prefix-cache namespace (vLLM's cache_salt): a request reuses, and leaves, cached
    # prompt blocks only for requests with the same salt. A server salts with the user, so
    # one user's prompts can neither serve nor be detected (cached_tokens, timing) by another.
    cache_salt: str | None = None
    # vLLM's: keep only the prompt's last this many tokens (-1: the context window's worth).
    truncate_prompt_tokens: int | None = None
    # AsyncLLM's outputs: cumulative by default, as vLLM's (the server streams deltas).
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        ids = self.stop_token_ids
        self.stop_token_ids = (
            [] if ids is None else _as_list(ids, "stop_token_ids", "a list of integers >= 0")
        )
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(
                self.allowed_token_ids, "allowed_token_ids", ALLOWED_IDS_RULE
            )
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = _as_list(self.bad_words, "bad_words", BAD_WORDS_RULE)
        self._take_guided_decoding()
        self._validate()

    def _take_guided_decoding(self) -> None:
        """Use vLLM's older `guided_decoding` as `structured_outputs`. Both naming the same
        structure is a copy of params made so (`clone`, `dataclasses.replace`)."""
        guided = self.guided_decoding
        if guided is None:
            return
        _require(
            isinstance(guided, StructuredOutputsParams),
            "guided_decoding",
            "a GuidedDecodingParams or None",
            guided,
        )
        if self.structured_outputs is not None and self.structured_outputs is not guided:
            raise ValueError(
                "give structured_outputs or guided_decoding (vLLM's older name for it), not both"
            )
        self.structured_outputs = guided

    def clone(self) -> SamplingParams:
        """vLLM's: a copy whose lists and dicts are its own, to change without touching
        this one (which a request may be running with)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def _validate(self) -> None:
        _require(is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        self._check_float("temperature", lambda t: t >= 0, ">= 0")
        self._check_float("top_p", lambda p: 0 < p <= 1, "in (0, 1]")
        _require(
            is_int(self.top_k) and (self.top_k in (-1, 0) or self.top_k >= 1),
            "top_k",
            "-1 or 0 (disabled) or an integer >= 1",
            self.top_k,
        )
        self._check_float("min_p", lambda p: 0 <= p <= 1, "in [0, 1]")
        self._check_float(
            "repetition_penalty",
            lambda r: REPETITION_PENALTY_MIN <= r <= REPETITION_PENALTY_MAX,
            f"in [{REPETITION_PENALTY_MIN}, {REPETITION_PENALTY_MAX}]",
        )
        self._check_float("presence_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        self._check_float("frequency_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        _require(
            self.seed is None or (is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            f"None or an integer in [{SEED_MIN}, {SEED_MAX}]",
            self.seed,
        )
        if self.seed is not None:
            _require(
                self.seed + self.n - 1 <= SEED_MAX,
                "seed",
                f"at most {SEED_MAX} - (n - 1) so every completion gets a seed (n={self.n})",
                self.seed,
            )
        _require(
            self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
            "cache_salt",
            "None or a non-empty string",
            self.cache_salt,
        )
        for s in self.stop:
            _require(isinstance(s, str) and s != "", "stop", "a list of non-empty strings", s)
        for t in self.stop_token_ids:
            _require(is_int(t) and t >= 0, "stop_token_ids", "a list of integers >= 0", t)
        for word in self.bad_words or ():
            _require(isinstance(word, str) and word.strip(), "bad_words", BAD_WORDS_RULE, word)
        allowed = self.allowed_token_ids
        if allowed is not None:
            _require(bool(allowed), "allowed_token_ids", ALLOWED_IDS_RULE, allowed)
            for t in allowed:
                _require(is_int(t) and t >= 0, "allowed_token_ids", ALLOWED_IDS_RULE, t)
        _require(
            self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 0),
            "max_tokens",
            "an integer >= 0 or None",
            self.max_tokens,
        )
        _require(
            is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            "an integer >= 0",
            self.min_tokens,
        )
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"<= max_tokens ({self.max_tokens})",
                self.min_tokens,
            )
        keep = self.truncate_prompt_tokens
        _require(
            keep is None or (is_int(keep) and (keep == -1 or keep >= 1)),
            "truncate_prompt_tokens",
            "-1 (the context window) or an integer >= 1",
            keep,
        )
        flags = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize")
        for name in flags:
            value = getattr(self, name)
            _require(isinstance(value, bool), name, "a boolean", value)
        if not self.detokenize and self.stop:
            raise ValueError("stop strings need detokenize=True: they are matched in the text")
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            _require(
                lp is None or (is_int(lp) and 0 <= lp <= MAX_LOGPROBS),
                name,
                f"None or an integer in [0, {MAX_LOGPROBS}]",
                lp,
            )
        _require(
            self.structured_outputs is None
            or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs",
            "a StructuredOutputsParams or None",
            self.structured_outputs,
        )
        _require(
            isinstance(self.output_kind, RequestOutputKind),
            "output_kind",
            "a RequestOutputKind",
            self.output_kind,
        )
        self._check_logit_bias()

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError naming the parameter unless every token id it holds is below
        `vocab_size`: the engine checks when a request is made, the server before it charges."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", list(self.logit_bias or ())),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            beyond = next((t for t in ids if t >= vocab_size), None)
            if beyond is not None:
                raise ValueError(
                    f"{name} must be token ids below the vocabulary size ({vocab_size}), "
                    f"got {beyond}"
                )

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        _require(isinstance(bias, dict), "logit_bias", "a dict of token id -> bias", bias)
        for token, value in bias.items():
            _require(is_int(token) and token >= 0, "logit_bias", "keyed by token ids >= 0", token)
            ok = _is_number(value) and math.isfinite(value) and abs(value) <= MAX_LOGIT_BIAS
            rule = f"a map to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            _require(ok, "logit_bias", rule, {token: value})

    def _check_float(self, name: str, in_range: Callable[[float], bool], rule: str) -> None:
        value = getattr(self, name)
        ok = _is_number(value) and _is_finite(value) and in_range(value)
        _require(ok, name, f"a finite number {rule}", value)
