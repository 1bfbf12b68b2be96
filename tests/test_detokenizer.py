"""Incremental detokenization: deltas add up to the full decode, never split a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.loader.gguf import read_gguf
from engine.loader.resolve import resolve_model
from engine.tokenizer import Tokenizer
from tests.test_tokenizer import write_sentencepiece_gguf

TEXTS = [
    "Hello, world! How are you today?",
    "Crème brûlée, naïve façade, Ångström",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧 done",
    "def f(x):\n    return {'a': [1, 2, 3]}  # ok\n\n",
    "  spaces   everywhere  \t tabs\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)


def _stream(tok, ids, step=1, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_deltas_concatenate_to_full_decode(tok, text, step):
    ids = tok.encode(text)
    detok, deltas = _stream(tok, ids, step)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_split_character_is_held_back(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_incomplete_tail_is_released_by_flush(tok):
    ids = tok.encode("ok 😀")[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add([i]) for i in ids)
    assert streamed == "ok "
    assert streamed + detok.flush() == tok.decode(ids)


def test_special_tokens_are_skipped_or_kept(tok):
    ids = tok.encode("Sure.<|im_end|>")
    assert ids[-1] == 2
    assert "".join(_stream(tok, ids)[1]) == "Sure."
    assert "".join(_stream(tok, ids, skip_special_tokens=False)[1]) == "Sure.<|im_end|>"


def test_prompt_tokens_are_context_not_output(tok):
    prompt = tok.encode("The answer is")
    gen = tok.encode(" forty two")
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
    deltas = [detok.add([i]) for i in gen]
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == " forty two"


class _CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, tok):
        self.tok = tok
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens)


def test_step_cost_does_not_grow_with_stream_length(tok):
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 1000
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, prompt_token_ids=ids[:50])
    out = "".join(detok.add([i]) for i in ids)
    assert out == tok.decode(ids)
    assert max(counting.sizes) <= 20


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=40), chunk=st.integers(1, 4))
def test_arbitrary_text_round_trips(tok, text, chunk):
    ids = tok.encode(text)
    _, deltas = _stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_sentencepiece_stream_keeps_word_spaces(tmp_path):
    spm = Tokenizer.from_gguf(read_gguf(write_sentencepiece_gguf(tmp_path)).metadata)
    prompt = spm.encode("the quick", add_special_tokens=True)
    gen = spm.encode(" brown fox jumps 😀 over")
    detok = IncrementalDetokenizer(spm, prompt_token_ids=prompt)
    deltas = [detok.add([i]) for i in gen] + [detok.flush()]
    full = spm.decode(prompt + gen)
    # Decoding the generated ids alone would drop the first word's space; in context it stays.
    assert "".join(deltas) == full[len(spm.decode(prompt)) :] == " brown fox jumps 😀 over"
    assert not any("\ufffd" in d for d in deltas)
