"""Output text logprobs: each token is given with the text it wrote, once."""

from __future__ import annotations

from engine.sampler import TokenLogprobs
from orchestrator.logprobs import TextLogprobs, TokenNames

# Byte tokens: "é" (two bytes) is written by two tokens, neither a character alone.
TOKENS = [b"H", b"i", b" \xc3", b"\xa9", b"!", b"<", b"x", b">"]
NAMES = TokenNames(lambda t: TOKENS[t].decode(errors="replace"), lambda t: TOKENS[t])


def _tokens(logprobs: list[dict]) -> bytes:
    return b"".join(bytes(lp["bytes"]) for lp in logprobs)


def test_tokens_come_with_the_text_they_wrote_and_a_split_character_keeps_its_bytes():
    text = TextLogprobs(NAMES, top_n=1)
    text.add([TokenLogprobs(t, -0.5 * t, [(t, -0.5 * t), (0, -9.0)]) for t in range(8)])
    # "Hi é!<x>": the server shows "Hi" and " é!", and not "<x>" (a call, say).
    assert _tokens(text.take(0, 2)) == b"Hi"
    first = text.take(2, 5)
    assert _tokens(first) == " é!".encode()
    assert [lp["token"] for lp in first] == [" \ufffd", "\ufffd", "!"]
    assert first[1] == {
        "token": "\ufffd",
        "logprob": -1.5,
        "bytes": [0xA9],
        "top_logprobs": [{"token": "\ufffd", "logprob": -1.5, "bytes": [0xA9]}],
    }
    assert text.take(8, 8) == []  # "<x>" was never shown: its tokens are not given


def test_each_token_is_given_once_with_the_piece_holding_its_characters():
    text = TextLogprobs(NAMES, top_n=0)
    text.add([TokenLogprobs(t, -1.0, []) for t in (0, 1)])  # "H", "i"
    assert _tokens(text.take(1, 2)) == b"i"  # "H" was taken out: dropped
    text.add([TokenLogprobs(2, -1.0, []), TokenLogprobs(3, -1.0, [])])  # " é"
    # " \xc3" writes the space (its "é" is the next token's): the two pieces of " é"
    assert _tokens(text.take(2, 3)) == b" \xc3"
    assert _tokens(text.take(3, 4)) == b"\xa9"
    text.add([TokenLogprobs(t, -1.0, []) for t in (4, 5)])  # "!", "<"
    assert _tokens(text.take(3, 5)) == b"!"  # "é" was given already


def test_one_cached_set_of_names_per_tokenizer():
    """The chat routes and the Responses API name tokens through one shared cache."""

    class Tokenizer:
        decodes = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            Tokenizer.decodes += 1
            return TOKENS[ids[0]].decode(errors="replace")

        def token_bytes(self, token_id: int) -> bytes:
            return TOKENS[token_id]

    tokenizer = Tokenizer()
    names = TokenNames.cached(tokenizer)
    assert TokenNames.cached(tokenizer) is names
    assert names.text(0) == TokenNames.cached(tokenizer).text(0) == "H"
    assert Tokenizer.decodes == 1
    assert TokenNames.cached(Tokenizer()) is not names
