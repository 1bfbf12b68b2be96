"""Logprob entries name tokens by their exact bytes: on the default model's tokenizer,
emoji and CJK characters come in tokens that each hold part of a character."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.loader.gguf import read_gguf
from engine.loader.resolve import resolve_model
from engine.tokenizer import Tokenizer
from orchestrator.logprobs import TextLogprobs, TokenNames
from server.logprobs import chat_logprobs, completion_logprobs

TEXT = "Hi 😀 日本語 café"


@dataclass
class Entry:
    token_id: int
    logprob: float
    top: list


@pytest.fixture(scope="module")
def names_and_ids():
    tok = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)
    names = TokenNames.cached(tok)
    ids = tok.encode(TEXT)
    assert any("\ufffd" in names.text(i) for i in ids)  # split characters, as intended
    return names, ids


def test_chat_logprob_bytes_join_back_to_the_text(names_and_ids):
    names, ids = names_and_ids
    entries = [Entry(i, -0.5, [(i, -0.5)]) for i in ids]
    content = chat_logprobs(entries, names, 1)["content"]
    assert bytes(b for item in content for b in item["bytes"]).decode() == TEXT
    assert all(item["top_logprobs"][0]["bytes"] == item["bytes"] for item in content)


def test_completion_offsets_stay_within_the_text(names_and_ids):
    names, ids = names_and_ids
    logprobs = completion_logprobs([Entry(i, -0.5, []) for i in ids], names, 0, offset=0)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(TEXT)
    # each token starts at the character its first byte belongs to
    position = 0
    for token_id, offset in zip(ids, offsets, strict=True):
        assert offset == len(TEXT.encode()[:position].decode(errors="ignore"))
        position += len(names.bytes(token_id))


def test_completion_top_logprobs_hold_the_token_itself(names_and_ids):
    """OpenAI's legacy logprobs: "always the logprob of the sampled token", so up to
    logprobs + 1 entries; an echoed prompt token outside the top is there too."""
    names, (a, b, *_) = names_and_ids
    entries = [Entry(a, -3.0, [(b, -0.1)]), Entry(b, -0.1, [(b, -0.1), (a, -3.0)])]
    top = completion_logprobs(entries, names, 1, offset=0)["top_logprobs"]
    assert top == [{names.text(b): -0.1, names.text(a): -3.0}, {names.text(b): -0.1}]
    none = completion_logprobs(entries, names, 0, offset=0)["top_logprobs"]
    assert none == [{names.text(a): -3.0}, {names.text(b): -0.1}]


@pytest.mark.parametrize("cut", range(len(TEXT) + 1))
def test_output_text_pieces_get_their_tokens_whole_wherever_the_text_is_cut(names_and_ids, cut):
    """The Responses API's output_text logprobs: the text shown in two pieces, cut at any
    character, gets every token once, so their bytes join to the text."""
    names, ids = names_and_ids
    text = TextLogprobs(names, 0)
    text.add([Entry(i, -0.5, []) for i in ids])
    taken = text.take(0, cut) + text.take(cut, len(TEXT))
    assert bytes(b for item in taken for b in item["bytes"]).decode() == TEXT
