"""Engine logprobs in the shapes OpenAI and vLLM use (chat, legacy completions, prompt)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine import RequestOutput
from orchestrator.logprobs import TokenNames, finite, token_logprob


def logprob_names(names: TokenNames, by_id: bool) -> TokenNames:
    """How logprobs name tokens: by their text, or (`by_id`: vLLM's
    `return_tokens_as_token_ids`) as "token_id:N", which names the exact token where its
    text alone cannot (a piece of a character, two tokens of the same text). The bytes
    stay the token's own, so text offsets and a client joining bytes see the same text."""
    if not by_id:
        return names
    return TokenNames(lambda token_id: f"token_id:{token_id}", names.bytes)


def chat_logprobs(entries: Sequence[Any], names: TokenNames, top_n: int) -> dict:
    """`choice.logprobs` of a chat completion: one item per generated token."""
    return {"content": [token_logprob(e, names, top_n) for e in entries], "refusal": None}


@dataclass(frozen=True)
class Unscored:
    """A token without a logprob: an echoed prompt's first, which nothing predicts."""

    token_id: int
    logprob: None = None
    top: None = None


def echoed_prompt(out: RequestOutput) -> list[Any]:
    """The logprob entries of an echoed prompt (the engine's prompt logprobs), its first
    token unscored: OpenAI gives it null logprobs."""
    scored = out.prompt_logprobs or []
    return [Unscored(out.prompt_token_ids[0]), *scored[1:]]


def _vllm_logprob(token_id: int, logprob: float, rank: int | None, names: TokenNames) -> dict:
    return {"logprob": finite(logprob), "rank": rank, "decoded_token": names.text(token_id)}


def _prompt_entry(entry: Any, names: TokenNames, top_n: int) -> dict[str, dict]:
    """One scored prompt token in vLLM's shape: the token itself, then the `top_n`
    likeliest, each under its id (a string, as JSON writes vLLM's int keys)."""
    own = _vllm_logprob(entry.token_id, entry.logprob, entry.rank, names)
    scored = {str(entry.token_id): own}
    for rank, (token_id, logprob) in enumerate(entry.top[:top_n], 1):
        scored.setdefault(str(token_id), _vllm_logprob(token_id, logprob, rank, names))
    return scored


def prompt_logprobs(out: RequestOutput, names: TokenNames, top_n: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first (nothing predicts
    it), then its own logprob and rank with the `top_n` likeliest tokens there."""
    scored = out.prompt_logprobs or []
    return [None, *(_prompt_entry(e, names, top_n) for e in scored[1:])]


def _completion_top(entry: Any, names: TokenNames, top_n: int) -> dict[str, float]:
    """One token's `top_logprobs` in the legacy shape: the `top_n` likeliest, and the token
    itself (OpenAI's "always the sampled token", so up to top_n + 1), which harnesses
    that score a prompt read to find its tokens' places among the likeliest."""
    top = {names.text(t): finite(lp) for t, lp in entry.top[:top_n]}
    top.setdefault(names.text(entry.token_id), finite(entry.logprob))
    return top


def completion_logprobs(entries: Sequence[Any], names: TokenNames, top_n: int, offset: int) -> dict:
    """`choice.logprobs` of a legacy completion; `offset` is where these tokens' text
    starts in the choice's text (so streamed chunks carry absolute offsets). A token's
    offset counts the characters the tokens before it completed: the tokens of one
    character split in pieces share its offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    characters = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for e in entries:
        tokens.append(names.text(e.token_id))
        if e.logprob is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(finite(e.logprob))
            top.append(_completion_top(e, names, top_n))
        offsets.append(offset)
        offset += len(characters.decode(names.bytes(e.token_id)))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }
