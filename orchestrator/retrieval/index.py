"""The retrieval index: chunks with their embeddings and text, searched by vector
similarity, by full-text BM25, or both fused.

`RetrievalIndex` is what the store's repositories call, inside their own transactions
(every method takes the `Connection`), so adding a file's chunks or deleting a file
commits together with the file's row. Every method takes the owner and filters on it.

`SqliteIndex` keeps chunks in the table `retrieval_chunks`, their embeddings in a
sqlite-vec `vec0` table partitioned by vector store, and an FTS5 table over their text
(`keyword_text`: NFKC-normalised and casefolded, CJK as two-character terms and single
characters); triggers keep both in step with the chunks. `ChunkTableIndex` holds what
any database's index shares (deletion, counts, fusion); `pg_index.PgIndex` is the
PostgreSQL one.
SQLite's vector search is sqlite-vec's exact k-nearest-neighbour scan of the requested
stores' partitions; attribute filters restrict that scan to the rows they select (rather
than thinning its results), so a selective filter never costs recall.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    Text,
    column,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    table,
    update,
)
from sqlalchemy import Table as SqlTable
from sqlalchemy.engine import Connection

from orchestrator.ids import Id
from orchestrator.retrieval.filters import (
    Filter,
    JsonAttributes,
    SqliteJsonAttributes,
    compile_filter,
)
from orchestrator.retrieval.fusion import reciprocal_rank_fusion

SearchMode = Literal["hybrid", "vector", "text"]


def ranker_mode(ranker: str) -> SearchMode:
    """How OpenAI's `ranking_options.ranker` searches: `none` asks for no re-ranking, the
    plain vector ranking; `auto` and `default-2024-11-15` are hybrid."""
    return "vector" if ranker == "none" else "hybrid"


metadata = MetaData()

retrieval_chunks = SqlTable(
    "retrieval_chunks",
    metadata,
    Column("id", Integer, primary_key=True),  # the FTS rowid
    Column("owner_id", Id(), nullable=False),
    Column("vector_store_id", Id(), nullable=False),
    Column("file_id", Id(), nullable=False),
    Column("filename", Text, nullable=False),
    Column("chunk_index", Integer, nullable=False),
    Column("text", Text, nullable=False),
    # The vector store file's attributes, copied onto each chunk so filters need no join.
    Column("attributes", JSON, nullable=False),
    Index("ix_retrieval_chunks_store", "vector_store_id", "owner_id"),
    Index("ix_retrieval_chunks_file", "vector_store_id", "file_id"),
)


# Vectors per sqlite-vec storage chunk. A partition (a vector store) holding any vector
# takes at least one whole chunk on disk: 1,024 (sqlite-vec's default) x 384 float32s is
# 1.5 MB, for a store of one small file. 128 makes that 196 KB; the price is a longer scan
# of large stores (k = 50 over 20,000 vectors of one store: 10.6 ms against 8.9, medians of
# 30 queries, 2026-12-05, 2-vCPU AMD EPYC avx512_vnni; sqlite-vec 0.1.9 has no SIMD).
VECTOR_CHUNK = 128


def sqlite_ddl(dimensions: int) -> tuple[str, ...]:
    """What SQLAlchemy cannot declare, run after creating `retrieval_chunks` (an Alembic
    migration runs the same statements): the vectors' `vec0` table, with the vector store
    as its partition key so a search reads only the stores it asks for; and an FTS5
    external-content table over the chunks' `keyword_text` (Porter-stemmed). Triggers
    delete a chunk's vector and text with it and keep the text index in step."""
    return (vectors_ddl(dimensions), _VECTORS_TRIGGER, *FTS_DDL)


def vectors_ddl(dimensions: int) -> str:
    """The vectors' table (also what migration 0008 rebuilds it with)."""
    return (
        "CREATE VIRTUAL TABLE IF NOT EXISTS retrieval_vectors USING vec0("
        "id INTEGER PRIMARY KEY, vector_store_id TEXT PARTITION KEY, owner_id TEXT, "
        f"embedding FLOAT[{dimensions}] DISTANCE_METRIC=cosine, chunk_size={VECTOR_CHUNK})"
    )


_VECTORS_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS retrieval_chunks_vectors_ad AFTER DELETE ON "
    "retrieval_chunks BEGIN DELETE FROM retrieval_vectors WHERE id = old.id; END"
)


# The FTS5 table over the chunks' keyword text (`keyword_text` of each chunk's text,
# through the SQL function of that name) and the triggers that keep it in step (also what
# migration 0012 rebuilds the text index with).
FTS_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS retrieval_chunks_fts USING fts5("
    "text, content='retrieval_chunks', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER IF NOT EXISTS retrieval_chunks_ai AFTER INSERT ON retrieval_chunks BEGIN "
    "INSERT INTO retrieval_chunks_fts(rowid, text) VALUES (new.id, keyword_text(new.text)); END",
    "CREATE TRIGGER IF NOT EXISTS retrieval_chunks_ad AFTER DELETE ON retrieval_chunks BEGIN "
    "INSERT INTO retrieval_chunks_fts(retrieval_chunks_fts, rowid, text) "
    "VALUES ('delete', old.id, keyword_text(old.text)); END",
    "CREATE TRIGGER IF NOT EXISTS retrieval_chunks_au AFTER UPDATE OF text ON retrieval_chunks "
    "BEGIN INSERT INTO retrieval_chunks_fts(retrieval_chunks_fts, rowid, text) "
    "VALUES ('delete', old.id, keyword_text(old.text)); "
    "INSERT INTO retrieval_chunks_fts(rowid, text) VALUES (new.id, keyword_text(new.text)); END",
)

_FTS_TRIGGERS = ("retrieval_chunks_ai", "retrieval_chunks_ad", "retrieval_chunks_au")


def rebuild_text_index(
    conn: Connection, ddl: tuple[str, ...] = FTS_DDL, indexed: str = "keyword_text(text)"
) -> None:
    """Drop SQLite's FTS5 table and its triggers, run `ddl` to make them again, and index
    `indexed` (an SQL expression over `retrieval_chunks`) of every stored chunk: what a
    migration that changes the indexed terms runs. FTS5's own 'rebuild' would index the
    raw text, and its 'delete' needs the very terms a row was indexed with, so a row
    indexed with other terms than the triggers' cannot be left in the table."""
    for trigger in _FTS_TRIGGERS:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.exec_driver_sql("DROP TABLE IF EXISTS retrieval_chunks_fts")
    for statement in ddl:
        conn.exec_driver_sql(statement)
    conn.exec_driver_sql(
        f"INSERT INTO retrieval_chunks_fts (rowid, text) SELECT id, {indexed} FROM retrieval_chunks"
    )


_VECTORS = table(
    "retrieval_vectors",
    column("id", Integer),
    column("vector_store_id"),
    column("owner_id"),
    column("embedding"),
    column("k"),
    column("distance"),
)
_FTS = table("retrieval_chunks_fts", column("rowid", Integer))
_FTS_SELF = literal_column("retrieval_chunks_fts")  # FTS5's hidden column named as its table


def sqlite_module() -> Any:
    """A DB-API sqlite3 module that can load extensions: the standard library's where it
    was built with extension loading, else `pysqlite3` (the `pysqlite3-binary` wheel)."""
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    return importlib.import_module("pysqlite3.dbapi2")


def load_sqlite_vec(dbapi_connection: Any, _record: Any = None) -> None:
    """A SQLAlchemy "connect" listener that loads sqlite-vec into each new connection."""
    import sqlite_vec

    dbapi_connection.enable_load_extension(True)
    sqlite_vec.load(dbapi_connection)
    dbapi_connection.enable_load_extension(False)


def prepare_sqlite_connection(dbapi_connection: Any, _record: Any = None) -> None:
    """A SQLAlchemy "connect" listener giving each new connection what the index's tables
    need: sqlite-vec (the vectors' table) and the `keyword_text` SQL function (the text
    index's triggers call it)."""
    load_sqlite_vec(dbapi_connection)
    dbapi_connection.create_function("keyword_text", 1, keyword_text, deterministic=True)


def sqlite_vec_engine(url: str = "sqlite://") -> Engine:
    """A SQLite engine whose connections have sqlite-vec and `keyword_text`; the store's
    engine for SQLite must be made the same way (`module=sqlite_module()` plus the
    listener)."""
    engine = create_engine(url, module=sqlite_module(), connect_args={"check_same_thread": False})
    event.listen(engine, "connect", prepare_sqlite_connection)
    return engine


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk to index: where it comes from, its text and its embedding."""

    file_id: str
    filename: str
    chunk_index: int
    text: str
    vector: np.ndarray  # float32, unit length
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchRequest:
    vector_store_ids: tuple[str, ...]
    query: str
    query_vector: np.ndarray
    filters: Filter | None = None
    max_num_results: int = 10
    score_threshold: float = 0.0
    mode: SearchMode = "hybrid"
    weights: tuple[float, float] = (1.0, 1.0)  # hybrid's (vector, text) weights


@dataclass(frozen=True)
class Hit:
    vector_store_id: str
    file_id: str
    filename: str
    chunk_index: int
    text: str
    attributes: dict
    score: float  # in [0, 1], higher is better


class RetrievalIndex(Protocol):
    """What the store needs from an index, whichever database holds it."""

    def create_schema(self, conn: Connection) -> None: ...

    def add(
        self, conn: Connection, owner: str, vector_store_id: str, chunks: list[ChunkRecord]
    ) -> None: ...

    def delete_file(
        self, conn: Connection, owner: str, vector_store_id: str, file_id: str
    ) -> int: ...

    def delete_vector_store(self, conn: Connection, owner: str, vector_store_id: str) -> int: ...

    def set_attributes(
        self, conn: Connection, owner: str, vector_store_id: str, file_id: str, attributes: dict
    ) -> None: ...

    def count(
        self, conn: Connection, owner: str, vector_store_id: str, file_id: str | None = None
    ) -> int: ...

    def search(self, conn: Connection, owner: str, request: SearchRequest) -> list[Hit]: ...


_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 64
# English function words: in nearly every chunk, so BM25 gives them almost no weight,
# yet each would make FTS5 walk a posting list as long as the index.
STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    }
)


# The scripts written without spaces between words (Korean has spaces, but a particle
# follows its noun: 서울은, "Seoul" + topic): Hangul jamo and syllables, Hiragana,
# Katakana (less its punctuation ゠ and ・) with its extensions and half-width forms, and
# Han ideographs (unified, extensions, compatibility, and 々 〆 〇). Every one is a `\w`.
_CJK_RUN = re.compile(
    "["
    "\u1100-\u11ff\u3005-\u3007\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff"
    "\u3131-\u318e\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0003134f"
    "]+"
)


def normalize(text: str) -> str:
    """`text` as both the index and its queries compare it: NFKC-normalised, so the
    half-width and full-width forms of a character are one (ｶﾀｶﾅ and カタカナ, ＡＢＣ１２３
    and ABC123, ㈱ and (株)), and casefolded (Straße and STRASSE). Only terms are made
    from it: hits and citations keep the stored text and its offsets."""
    return unicodedata.normalize("NFKC", text).casefold()


def keyword_text(text: str) -> str:
    """`text` as the full-text index sees it (`normalize`d): each run of CJK characters
    becomes its overlapping two-character terms and its single characters (北京是首都 ->
    北京 京是 是首 首都 北 京 是 首 都), spaced apart; all else is left as it is, so
    English is tokenised, stemmed and ranked as without it. Chinese and Japanese put no
    space between words, so without this a sentence was one token and no word in it
    could be found; the single characters let a one-character query (猫) find the
    character inside a run (小猫). Every back end indexes this same function's output."""
    return _CJK_RUN.sub(_bigrams_and_characters, normalize(text))


def _bigrams_and_characters(run: re.Match) -> str:
    chars = run.group()
    pairs = [chars[i : i + 2] for i in range(len(chars) - 1)]
    return f" {' '.join([*pairs, *chars])} "


def cjk_bigrams(text: str) -> str:
    """`text` with each run of CJK characters as its overlapping two-character terms,
    spaced apart (a lone character stays itself), not normalised: the query's CJK terms
    (`keyword_words`), and the whole of the keyword text of revisions 0012 to 0014."""
    return _CJK_RUN.sub(_bigrams, text)


def _bigrams(run: re.Match) -> str:
    chars = run.group()
    pairs = [chars[i : i + 2] for i in range(len(chars) - 1)] or [chars]
    return f" {' '.join(pairs)} "


def is_cjk(word: str) -> bool:
    """Whether `word` is a term `keyword_words` made of CJK characters."""
    return _CJK_RUN.fullmatch(word) is not None


def keyword_words(text: str) -> list[str]:
    """The words of `text` as a query matches them (`normalize`d): a run of CJK
    characters is its two-character terms, a lone CJK character itself (each a term of
    `keyword_text`). A longer run never gives its single characters: they would match
    every text sharing any one character (熊猫, "panda", would find every 猫, "cat")."""
    return _WORD.findall(cjk_bigrams(normalize(text)))


def query_terms(text: str) -> list[str]:
    """A user's query as full-text terms: its distinct words (`keyword_words`) less
    stopwords (all of them if nothing else is left), at most MAX_QUERY_TERMS."""
    words = list(dict.fromkeys(keyword_words(text)))
    return ([w for w in words if w not in STOPWORDS] or words)[:MAX_QUERY_TERMS]


def fts_query(text: str) -> str | None:
    """A user's query as an FTS5 expression: its terms, each quoted so no word is read as
    an operator, joined by OR so BM25 ranks partial matches; None without words."""
    return " OR ".join(f'"{t}"' for t in query_terms(text)) or None


def candidates_for(max_num_results: int) -> int:
    """How deep each ranked list goes before fusion: deep enough that a chunk ranked
    moderately by both methods can rise into the fused top results."""
    return max(50, 5 * max_num_results)


class ChunkTableIndex:
    """What every index on the `retrieval_chunks` table shares: deletion, attributes,
    counts, and the search itself (rankings, fusion, threshold); a database's index
    adds its schema, its inserts and its two rankings."""

    table = retrieval_chunks

    def __init__(self, dimensions: int = 384) -> None:
        self.dimensions = dimensions

    def json_attributes(self) -> JsonAttributes:
        raise NotImplementedError

    def _vector_ranking(
        self, conn: Connection, owner: str, request: SearchRequest, depth: int
    ) -> list[tuple[int, float]]:
        raise NotImplementedError

    def _text_ranking(
        self, conn: Connection, owner: str, request: SearchRequest, depth: int
    ) -> list[tuple[int, float]]:
        raise NotImplementedError

    def delete_file(self, conn: Connection, owner: str, vector_store_id: str, file_id: str) -> int:
        t = self.table
        return conn.execute(
            delete(t).where(
                t.c.owner_id == owner,
                t.c.vector_store_id == vector_store_id,
                t.c.file_id == file_id,
            )
        ).rowcount

    def delete_vector_store(self, conn: Connection, owner: str, vector_store_id: str) -> int:
        t = self.table
        return conn.execute(
            delete(t).where(t.c.owner_id == owner, t.c.vector_store_id == vector_store_id)
        ).rowcount

    def set_attributes(
        self, conn: Connection, owner: str, vector_store_id: str, file_id: str, attributes: dict
    ) -> None:
        t = self.table
        conn.execute(
            update(t)
            .where(
                t.c.owner_id == owner,
                t.c.vector_store_id == vector_store_id,
                t.c.file_id == file_id,
            )
            .values(attributes=attributes)
        )

    def count(
        self, conn: Connection, owner: str, vector_store_id: str, file_id: str | None = None
    ) -> int:
        t = self.table
        where = [t.c.owner_id == owner, t.c.vector_store_id == vector_store_id]
        if file_id is not None:
            where.append(t.c.file_id == file_id)
        return conn.execute(select(func.count()).select_from(t).where(*where)).scalar_one()

    def search(self, conn: Connection, owner: str, request: SearchRequest) -> list[Hit]:
        depth = (
            request.max_num_results
            if request.mode != "hybrid"
            else candidates_for(request.max_num_results)
        )
        ranked: list[list[tuple[int, float]]] = []
        if request.mode in ("hybrid", "vector"):
            ranked.append(self._vector_ranking(conn, owner, request, depth))
        if request.mode in ("hybrid", "text"):
            ranked.append(self._text_ranking(conn, owner, request, depth))
        scored = (
            reciprocal_rank_fusion(ranked, list(request.weights))
            if request.mode == "hybrid"
            else ranked[0]
        )
        scored = [(i, s) for i, s in scored if s >= request.score_threshold]
        return self._hits(conn, scored[: request.max_num_results])

    def _where(self, owner: str, request: SearchRequest) -> list:
        t = self.table
        where = [t.c.owner_id == owner, t.c.vector_store_id.in_(request.vector_store_ids)]
        if request.filters is not None:
            where.append(compile_filter(request.filters, self.json_attributes()))
        return where

    def _hits(self, conn: Connection, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        t = self.table
        rows = {
            row.id: row for row in conn.execute(select(t).where(t.c.id.in_([i for i, _ in scored])))
        }
        return [
            Hit(
                rows[i].vector_store_id,
                rows[i].file_id,
                rows[i].filename,
                rows[i].chunk_index,
                rows[i].text,
                rows[i].attributes,
                score,
            )
            for i, score in scored
        ]


class SqliteIndex(ChunkTableIndex):
    """`RetrievalIndex` on SQLite with sqlite-vec and FTS5."""

    def create_schema(self, conn: Connection) -> None:
        metadata.create_all(conn, tables=[self.table])
        for statement in sqlite_ddl(self.dimensions):
            conn.exec_driver_sql(statement)

    def json_attributes(self) -> JsonAttributes:
        return SqliteJsonAttributes(self.table.c.attributes)

    def add(
        self, conn: Connection, owner: str, vector_store_id: str, chunks: list[ChunkRecord]
    ) -> None:
        if not chunks:
            return
        ids = (
            conn.execute(
                insert(self.table).returning(self.table.c.id, sort_by_parameter_order=True),
                [
                    {
                        "owner_id": owner,
                        "vector_store_id": vector_store_id,
                        "file_id": c.file_id,
                        "filename": c.filename,
                        "chunk_index": c.chunk_index,
                        "text": c.text,
                        "attributes": c.attributes,
                    }
                    for c in chunks
                ],
            )
            .scalars()
            .all()
        )
        conn.exec_driver_sql(
            "INSERT INTO retrieval_vectors(id, vector_store_id, owner_id, embedding) "
            "VALUES (?, ?, ?, ?)",
            [
                (i, vector_store_id, owner, _vector_bytes(c.vector))
                for i, c in zip(ids, chunks, strict=True)
            ],
        )

    def _vector_ranking(
        self, conn: Connection, owner: str, request: SearchRequest, depth: int
    ) -> list[tuple[int, float]]:
        """Chunk ids by cosine similarity, best first, scored max(0, similarity): sqlite-vec's
        exact k-nearest scan of each requested store's partition (k per partition, merged
        here), restricted to the filtered chunks when there are filters."""
        v = _VECTORS
        where = [
            v.c.embedding.op("MATCH")(_vector_bytes(request.query_vector)),
            v.c.k == depth,
            v.c.vector_store_id.in_(request.vector_store_ids),
            v.c.owner_id == owner,
        ]
        if request.filters is not None:
            t = self.table
            where.append(v.c.id.in_(select(t.c.id).where(*self._where(owner, request))))
        rows = conn.execute(select(v.c.id, v.c.distance).where(*where)).all()
        best = sorted(rows, key=lambda row: (row.distance, row.id))[:depth]
        return [(row.id, max(0.0, 1.0 - row.distance)) for row in best]

    def _text_ranking(
        self, conn: Connection, owner: str, request: SearchRequest, depth: int
    ) -> list[tuple[int, float]]:
        """Chunk ids by BM25, best first, scored relative to the best match (1.0)."""
        expression = fts_query(request.query)
        if expression is None:
            return []
        t = self.table
        # The full-text match runs first, once (a materialised CTE): joined directly,
        # SQLite's planner may probe the FTS index once per candidate row instead.
        matches = (
            select(_FTS.c.rowid, func.bm25(_FTS_SELF).label("rank"))
            .where(_FTS_SELF.op("MATCH")(expression))
            .cte("matches")
            .prefix_with("MATERIALIZED")
        )
        rows = conn.execute(
            select(t.c.id, matches.c.rank)
            .select_from(matches.join(t, t.c.id == matches.c.rowid))
            .where(*self._where(owner, request))
            .order_by(matches.c.rank)
            .limit(depth)
        ).all()
        if not rows:
            return []
        best = rows[0].rank
        return [(row.id, row.rank / best if best < 0 else 1.0) for row in rows]
