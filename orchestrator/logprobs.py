"""Token logprobs in OpenAI's per-token shape (`token`, `logprob`, `bytes`,
`top_logprobs`), which chat completions (server/logprobs.py) and the Responses API's
`output_text` share, and `TextLogprobs`, which lines a generation's logprobs up with the
text a response shows of it."""

from __future__ import annotations

import codecs
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report this floor instead


@dataclass(frozen=True)
class TokenNames:
    """How logprobs name a token: its text decoded alone, and its exact bytes. A token
    holding part of a character decodes alone to U+FFFD; its bytes are what a client
    joins to rebuild the text."""

    text: Callable[[int], str]
    bytes: Callable[[int], bytes]

    @classmethod
    @lru_cache(maxsize=4)
    def cached(cls, tokenizer: Any) -> TokenNames:
        """The names `tokenizer` gives, each id looked up once: logprobs name every top
        token, so the same ids come back again and again. One instance per tokenizer, so
        the chat routes and the Responses API share its caches."""
        return cls(
            lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t], skip_special_tokens=False)),
            lru_cache(maxsize=65536)(tokenizer.token_bytes),
        )


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _named(token_id: int, logprob: float, names: TokenNames) -> dict[str, Any]:
    return {
        "token": names.text(token_id),
        "logprob": finite(logprob),
        "bytes": list(names.bytes(token_id)),
    }


def token_logprob(entry: Any, names: TokenNames, top_n: int) -> dict[str, Any]:
    """One generated token (an engine `TokenLogprobs`) with its `top_n` likeliest."""
    item = _named(entry.token_id, entry.logprob, names)
    item["top_logprobs"] = [_named(t, lp, names) for t, lp in entry.top[:top_n]]
    return item


class TextLogprobs:
    """One generation's token logprobs, handed out with the text shown of it.

    The response shows the generation's text less what the server takes out of it
    (tool-call blocks and the whitespace beside them; stop strings never reach the text),
    in pieces, each at a known offset in that text. A token's characters are found by
    decoding the tokens' bytes in order, so a token holding part of a character sits
    where that character does. `take(start, end)` gives the tokens whose characters
    overlap `[start, end)`, each once (a token reaching past `end` goes with the piece
    where it starts), and drops the tokens before `start`: their text is not shown."""

    def __init__(self, names: TokenNames, top_n: int) -> None:
        self.names = names
        self.top_n = top_n
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._end = 0  # characters the tokens so far decode to
        # (first character, end, entry); a token of no character of its own ends one past
        # where it starts, with the character it begins.
        self._pending: deque[tuple[int, int, Any]] = deque()

    def add(self, entries: Sequence[Any]) -> None:
        """The engine's logprob entries of newly generated tokens, in order."""
        for entry in entries:
            start = self._end
            self._end += len(self._decoder.decode(self.names.bytes(entry.token_id)))
            self._pending.append((start, max(self._end, start + 1), entry))

    def take(self, start: int, end: int) -> list[dict[str, Any]]:
        """The logprobs of the tokens that wrote the generation's text[start:end]."""
        pending = self._pending
        while pending and pending[0][1] <= start:
            pending.popleft()
        taken = []
        while pending and pending[0][0] < end:
            taken.append(token_logprob(pending.popleft()[2], self.names, self.top_n))
        return taken
