"""Token-aware chunking with OpenAI's `chunking_strategy` semantics.

Chunks are windows of `max_chunk_size_tokens` tokens of the embedding model's tokenizer,
each starting `max_chunk_size_tokens - chunk_overlap_tokens` tokens after the previous
one (OpenAI's default: 800 tokens, 400 overlap). A chunk's text is the slice of the
original text its tokens cover, located through the tokenizer's character offsets, so
case, spacing and punctuation survive (the tokenizer itself lowercases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

DEFAULT_MAX_TOKENS = 800
DEFAULT_OVERLAP_TOKENS = 400
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 100, 4096


@dataclass(frozen=True)
class StaticChunking:
    max_chunk_size_tokens: int = DEFAULT_MAX_TOKENS
    chunk_overlap_tokens: int = DEFAULT_OVERLAP_TOKENS

    def __post_init__(self) -> None:
        size, overlap = self.max_chunk_size_tokens, self.chunk_overlap_tokens
        if not MIN_MAX_TOKENS <= size <= MAX_MAX_TOKENS:
            raise ValueError(
                f"chunking_strategy.static.max_chunk_size_tokens must be between "
                f"{MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}, got {size}"
            )
        if not 0 <= overlap <= size // 2:
            raise ValueError(
                "chunking_strategy.static.chunk_overlap_tokens must be between 0 "
                f"and half of max_chunk_size_tokens ({size // 2}), got {overlap}"
            )

    def to_dict(self) -> dict:
        """The strategy as OpenAI reports it on a vector store file."""
        return {
            "type": "static",
            "static": {
                "max_chunk_size_tokens": self.max_chunk_size_tokens,
                "chunk_overlap_tokens": self.chunk_overlap_tokens,
            },
        }


def _int_field(static: dict, name: str) -> int:
    if name not in static:
        raise ValueError(f"chunking_strategy.static.{name} is required")
    value = static[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"chunking_strategy.static.{name} must be an integer")
    return value


def _only(value: dict, keys: tuple[str, ...], where: str) -> None:
    """A key of `value` outside `keys` is a ValueError naming it: a misspelt field would
    otherwise be ignored and the file chunked as the client did not ask."""
    for key in value:
        if key not in keys:
            raise ValueError(f"{where}.{key} is not a field of {where}")


def parse_chunking_strategy(value: Any) -> StaticChunking:
    """A request's `chunking_strategy` (absent, {"type": "auto"} or {"type": "static", ...});
    raises ValueError with a message naming the bad field."""
    if value is None:
        return StaticChunking()
    if not isinstance(value, dict) or value.get("type") not in ("auto", "static"):
        raise ValueError("chunking_strategy.type must be 'auto' or 'static'")
    if value["type"] == "auto":
        _only(value, ("type",), "chunking_strategy")
        return StaticChunking()
    _only(value, ("type", "static"), "chunking_strategy")
    static = value.get("static")
    if not isinstance(static, dict):
        raise ValueError("chunking_strategy.static must be an object")
    _only(static, ("max_chunk_size_tokens", "chunk_overlap_tokens"), "chunking_strategy.static")
    return StaticChunking(
        _int_field(static, "max_chunk_size_tokens"), _int_field(static, "chunk_overlap_tokens")
    )


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the file, from 0
    text: str
    start: int  # character offsets into the extracted text
    end: int
    n_tokens: int


def chunk_text(
    text: str, tokenizer: Tokenizer, strategy: StaticChunking | None = None
) -> list[Chunk]:
    """Split `text` into overlapping token windows; an empty text has no chunks."""
    strategy = strategy or StaticChunking()
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    size = strategy.max_chunk_size_tokens
    step = size - strategy.chunk_overlap_tokens
    chunks: list[Chunk] = []
    for start in range(0, len(offsets), step):
        window = offsets[start : start + size]
        begin, end = window[0][0], window[-1][1]
        chunks.append(Chunk(len(chunks), text[begin:end], begin, end, len(window)))
        if start + size >= len(offsets):
            break
    return chunks
