"""Token windows with OpenAI's chunking_strategy semantics."""

from __future__ import annotations

import pytest

from orchestrator.retrieval.chunking import StaticChunking, chunk_text, parse_chunking_strategy
from orchestrator.retrieval.embeddings import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _words(n: int) -> str:
    return " ".join(f"Word{i}" if i % 2 else "plain" for i in range(n))


def test_default_is_openais_800_with_400_overlap(tokenizer):
    text = _words(1500)
    total = len(tokenizer.encode(text, add_special_tokens=False).ids)
    chunks = chunk_text(text, tokenizer)
    assert [c.n_tokens for c in chunks[:-1]] == [800] * (len(chunks) - 1)
    assert chunks[-1].n_tokens <= 800
    starts = [len(tokenizer.encode(text[: c.start], add_special_tokens=False).ids) for c in chunks]
    assert starts == list(range(0, 400 * len(chunks), 400))
    assert starts[-1] + chunks[-1].n_tokens == total  # the last window reaches the end


def test_chunks_are_slices_of_the_original_text(tokenizer):
    text = "Mixed CASE text, with punctuation!  And  double spaces.\n" * 40
    chunks = chunk_text(text, tokenizer, StaticChunking(100, 20))
    assert len(chunks) > 3
    for c in chunks:
        assert c.text == text[c.start : c.end]
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) == c.n_tokens
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # consecutive chunks share exactly the overlap
    assert chunks[1].start < chunks[0].end


def test_short_and_empty_texts(tokenizer):
    assert chunk_text("", tokenizer) == []
    (only,) = chunk_text("just a few words", tokenizer)
    assert only.text == "just a few words"


def test_strategy_parsing_and_limits():
    assert parse_chunking_strategy(None) == StaticChunking(800, 400)
    assert parse_chunking_strategy({"type": "auto"}) == StaticChunking(800, 400)
    static = {
        "type": "static",
        "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 150},
    }
    assert parse_chunking_strategy(static) == StaticChunking(300, 150)
    assert StaticChunking(300, 150).to_dict() == static
    bad = [
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
            "max_chunk_size_tokens",
        ),
        (
            {
                "type": "static",
                "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0},
            },
            "max_chunk_size_tokens",
        ),
        (
            {
                "type": "static",
                "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 151},
            },
            "chunk_overlap_tokens",
        ),
        ({"type": "static", "static": {"max_chunk_size_tokens": 300}}, "chunk_overlap_tokens"),
        (
            {
                "type": "static",
                "static": {"max_chunk_size_tokens": "300", "chunk_overlap_tokens": 0},
            },
            "max_chunk_size_tokens",
        ),
        ({"type": "fixed"}, "chunking_strategy.type"),
        ({"type": "auto", "size": 100}, r"chunking_strategy\.size is not a field"),
        (
            {"type": "static", "static": {**static["static"], "overlap": 0}},
            r"chunking_strategy\.static\.overlap is not a field",
        ),
        ({**static, "auto": {}}, r"chunking_strategy\.auto is not a field"),
    ]
    for value, field in bad:
        with pytest.raises(ValueError, match=field):
            parse_chunking_strategy(value)
