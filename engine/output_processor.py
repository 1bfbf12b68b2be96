"""Turns sampled tokens into text and decides when a sequence is finished.

Stop strings are never emitted: text is held back only while its tail could still
grow into a stop string, so streams stay as live as possible.
"""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import TokenLogprobs
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class OutputProcessor:
    def __init__(
        self, tokenizer: Tokenizer | None, eos_token_ids: set[int], max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def token_text(self, token_id: int) -> str | None:
        """One token's text, as vLLM's `Logprob.decoded_token` gives it."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def start(self, seq: Sequence) -> None:
        if self.tokenizer is not None and seq.params.detokenize:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                skip_special_tokens=seq.params.skip_special_tokens,
                prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            )

    def append(
        self,
        seq: Sequence,
        token: int,
        logprobs: TokenLogprobs | None,
        max_tokens: int,
        grammar_complete: bool = False,
    ):
        """Record one sampled token and set `seq.finish_reason` if it ends the sequence
        (`grammar_complete`: its structured-output grammar accepts no further token)."""
        params = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            if params.detokenize:  # else decoded_token is None, as vLLM's
                logprobs.decode = self.token_text
            seq.logprobs.append(logprobs)
        n_out = seq.num_output_tokens
        past_min = n_out > params.min_tokens
        if past_min and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif past_min and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        # As vLLM's: the stop token (or EOS) that ended the output keeps its text only with
        # include_stop_str_in_output; its text then looks for no stop string.
        if seq.finish_reason is None or params.include_stop_str_in_output:
            self._append_text(seq, token, past_min and seq.finish_reason is None)
        if seq.finish_reason is None and grammar_complete:
            seq.finish_reason = "stop"
        if seq.finish_reason is None and (
            n_out >= max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and not isinstance(seq.stop_reason, str):
            self._flush(seq)

    def _flush(self, seq: Sequence) -> None:
        """Release what the detokenizer held back waiting for the rest of a UTF-8
        character: a stream that ends mid-character must not lose those bytes."""
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()

    def _append_text(self, seq: Sequence, token: int, check_stops: bool) -> None:
        if seq.detokenizer is None:
            return
        delta = seq.detokenizer.add([token])
        if not delta:
            return
        seq.text += delta
        stops = seq.params.stop
        if not (stops and check_stops):
            return
        # Only a match that ends in the new text counts: one wholly before it completed
        # while min_tokens held stops back, and that text may have been streamed already.
        new_from = len(seq.text) - len(delta)
        hits = [(seq.text.find(s, max(0, new_from - len(s) + 1)), s) for s in stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, stop = min(hits)
            seq.text = seq.text[: i + len(stop) if seq.params.include_stop_str_in_output else i]
            seq.finish_reason, seq.stop_reason = "stop", stop

    def take_delta(self, seq: Sequence) -> tuple[str, list[int], list[TokenLogprobs]]:
        """What is new since the last call: text (minus any held-back tail), tokens, logprobs."""
        end = len(seq.text)
        if seq.finish_reason is None and seq.params.stop:
            end -= _held_back(seq.text, seq.params.stop)
        text = seq.text[seq.num_emitted_chars : end] if end > seq.num_emitted_chars else ""
        seq.num_emitted_chars = max(seq.num_emitted_chars, end)
        start = seq.num_prompt_tokens + seq.num_emitted_tokens
        tokens = seq.token_ids[start:]
        logprobs = seq.logprobs[seq.num_emitted_tokens :] if seq.logprobs else []
        seq.num_emitted_tokens += len(tokens)
        return text, tokens, logprobs
