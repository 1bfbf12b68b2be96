"""A file's bytes -> the chunk records the index stores: extract, chunk, embed.

Extraction runs in a subprocess (PDF, HTML) or on a worker thread, chunking on a worker thread
and embedding on the embedder's own, so a large PDF never blocks the event loop. Errors
are `ExtractionError`s whose message is meant for the vector store file's `last_error`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

from orchestrator.retrieval.chunking import Chunk, StaticChunking, chunk_text
from orchestrator.retrieval.embeddings import Embedder, Encoded
from orchestrator.retrieval.extract import MAX_TEXT_CHARACTERS, ExtractionError, extract_text
from orchestrator.retrieval.index import ChunkRecord

# OpenAI indexes at most 5,000,000 tokens of a file. Its characters are checked first,
# so that a file far past it is refused before it is tokenized (20 million characters
# are ~5 million tokens of English; tokenizing them takes seconds and about 2 GB).
MAX_FILE_TOKENS = 5_000_000
MAX_FILE_CHARACTERS = MAX_TEXT_CHARACTERS  # 4 a token: what a PDF's reader gives back


def split_text(
    text: str, filename: str, embedder: Embedder, strategy: StaticChunking | None = None
) -> list[Chunk]:
    too_long = ExtractionError(
        f"{filename!r} has more text than one file may have indexed (at most "
        f"{MAX_FILE_TOKENS:,} tokens); split it into smaller files"
    )
    if len(text) > MAX_FILE_CHARACTERS:
        raise too_long
    strategy = strategy or StaticChunking()
    chunks = chunk_text(text, embedder.tokenizer, strategy)
    if not chunks:
        raise ExtractionError(f"{filename!r} has no text to index")
    step = strategy.max_chunk_size_tokens - strategy.chunk_overlap_tokens
    if chunks[-1].index * step + chunks[-1].n_tokens > MAX_FILE_TOKENS:  # the file's tokens
        raise too_long
    return chunks


async def prepare_chunks(
    embedder: Embedder,
    file_id: str,
    filename: str,
    data: bytes,
    content_type: str | None = None,
    strategy: StaticChunking | None = None,
    attributes: dict | None = None,
    embed: Callable[[list[str]], Awaitable[Encoded]] | None = None,
) -> list[ChunkRecord]:
    """The file's chunks with their embeddings, ready for `RetrievalIndex.add`; `embed`
    (the embedder's `aencode` in the background by default) embeds their texts, as a
    server meters them for the file's owner. The embedder works in batches, so a cancelled
    ingestion (the file removed or added again, the server stopping) stops after the batch
    under way, not after the whole file."""
    text = await extract_text(data, filename, content_type)
    chunks = await asyncio.to_thread(split_text, text, filename, embedder, strategy)
    embed = embed or partial(embedder.aencode, background=True)
    vectors = (await embed([c.text for c in chunks])).vectors
    return [
        ChunkRecord(file_id, filename, c.index, c.text, vector, dict(attributes or {}))
        for c, vector in zip(chunks, vectors, strict=True)
    ]
