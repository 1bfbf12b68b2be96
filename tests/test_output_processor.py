"""Output processing on the default model's tokenizer: text of a sequence that ends in
the middle of a multi-byte character, and stop strings held back across tokens."""

from __future__ import annotations

import pytest

from engine.loader import resolve_model
from engine.loader.gguf import read_gguf
from engine.output_processor import OutputProcessor
from engine.sampling_params import SamplingParams
from engine.sequence import Request, Sequence
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)


def _run(tok: Tokenizer, tokens: list[int], params: SamplingParams) -> tuple[str, str | None]:
    prompt = tok.encode("Say something:")
    request = Request("r", None, prompt, params)
    seq = Sequence(request, 0, list(prompt), len(prompt))
    proc = OutputProcessor(tok, set(tok.stop_token_ids), max_model_len=4096)
    proc.start(seq)
    text = ""
    for t in tokens:
        proc.append(seq, t, None, max_tokens=params.max_tokens)
        text += proc.take_delta(seq)[0]
        if seq.finish_reason:
            break
    return text, seq.finish_reason


def test_length_cut_mid_character_keeps_the_bytes(tok):
    ids = tok.encode("ok 🦜")
    # The emoji's bytes are split over several tokens; stop after the first of them.
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    text, reason = _run(tok, ids, SamplingParams(max_tokens=cut))
    assert reason == "length"
    assert text == tok.decode(ids[:cut])


def test_stop_string_spanning_tokens_is_never_emitted(tok):
    ids = tok.encode("The answer is Paris, of course.")
    text, reason = _run(tok, ids, SamplingParams(max_tokens=64, stop=["Paris"]))
    assert (text, reason) == ("The answer is ", "stop")


def test_a_stop_string_completed_within_min_tokens_does_not_stop_later(tok):
    """The stop string "two" completes while min_tokens holds stops back, and is streamed: a
    later token must not find it again, whether or not a longer stop string widens the
    search (vLLM's min_tokens: stop strings count from the first token past it)."""
    ids = tok.encode("one two three four five six seven")
    for stop in (["two"], ["two", "a-much-longer-stop"]):
        params = SamplingParams(max_tokens=len(ids), min_tokens=3, stop=stop)
        assert _run(tok, ids, params) == ("one two three four five six seven", "length")


def test_include_stop_str_in_output_keeps_the_stop_tokens_text(tok):
    """vLLM's include_stop_str_in_output covers a stop token id and EOS as well as a stop
    string: the token that ended the output keeps its text (EOS's shows only with
    skip_special_tokens=False); without it the text stops before that token."""
    ids = tok.encode("one two three")
    eos = tok.eos_token_id
    for include in (False, True):
        params = SamplingParams(
            max_tokens=8, stop_token_ids=[ids[1]], include_stop_str_in_output=include
        )
        assert _run(tok, ids, params) == ("one two" if include else "one", "stop")
        special = SamplingParams(
            max_tokens=8, skip_special_tokens=False, include_stop_str_in_output=include
        )
        expected = "one" + (tok.decode([eos], skip_special_tokens=False) if include else "")
        assert _run(tok, [ids[0], eos], special) == (expected, "stop")
