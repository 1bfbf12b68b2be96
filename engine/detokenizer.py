"""Incremental detokenization for streaming.

Decoding a token alone is wrong in two ways: a byte-level token can end in the middle
of a multi-byte UTF-8 character, and SentencePiece-style decoders drop a token's leading
space when it starts the decoded text. So each step decodes a short window of recent
tokens, diffs it against the characters of that window already emitted, and holds back
a trailing U+FFFD (an incomplete character) until the next token completes it. The
window is cut back to a few context tokens once it grows, so a step costs O(new tokens)
however long the stream gets.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Tokens kept as decoding context after the window is cut; enough for the decoder to
# see word boundaries and for a UTF-8 character split over up to four byte tokens.
_CONTEXT_TOKENS = 4
# Cut the window back when it is this long and ends on a complete character.
_MAX_WINDOW = 16


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas.

    The concatenated deltas plus `flush()` equal the text the generated tokens add to the
    prompt's decode; for byte-level BPE (Llama 3, Qwen, SmolLM) that is exactly
    `tokenizer.decode(generated_ids)`. The prompt's last tokens are only context, so the
    first delta gets its leading space right.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # Characters of decode(self._window) already emitted (or belonging to the prompt).
        self._emitted = len(self._decode(self._window))
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (joined lazily: streams read it once, at the end)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text they complete ("" if none yet)."""
        self._window.extend(token_ids)
        full = self._decode(self._window)
        end = len(full)
        while end > self._emitted and full[end - 1] == _REPLACEMENT:
            end -= 1
        delta = full[self._emitted : end]
        self._emitted = max(self._emitted, end)
        if end == len(full) and len(self._window) > _MAX_WINDOW:
            self._window = self._window[-_CONTEXT_TOKENS:]
            self._emitted = len(self._decode(self._window))
        if delta:
            self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """At the end of a stream: emit held-back U+FFFD, i.e. bytes no token completed."""
        delta = self._decode(self._window)[self._emitted :]
        self._emitted += len(delta)
        if delta:
            self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
