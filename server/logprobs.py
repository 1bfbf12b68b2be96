"""Engine logprobs in the two shapes OpenAI uses (chat and legacy completions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

TokenText = Callable[[int], str]
_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report this floor instead


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def _chat_entry(token_id: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(entries: Sequence[Any], token_text: TokenText, top_n: int) -> dict:
    """`choice.logprobs` of a chat completion: one item per generated token."""
    content = []
    for e in entries:
        item = _chat_entry(e.token_id, e.logprob, token_text)
        item["top_logprobs"] = [_chat_entry(t, lp, token_text) for t, lp in e.top[:top_n]]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[Any], token_text: TokenText, top_n: int, offset: int
) -> dict:
    """`choice.logprobs` of a legacy completion; `offset` is where these tokens' text
    starts in the choice's text (so streamed chunks carry absolute offsets)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(e.logprob))
        top.append({token_text(t): _finite(lp) for t, lp in e.top[:top_n]})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }
