"""Files and vector stores below the HTTP layer: ingestion resumed after a restart,
ownership on both databases, and the whole round on PostgreSQL (pgvector), or a clear
refusal where it lacks pgvector."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from orchestrator import FileService, VectorStoreService
from orchestrator.retrieval import pg_index
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.retrieval.index import SearchRequest, SqliteIndex
from orchestrator.store import Page, Store
from orchestrator.store import knowledge as kb
from tests.server.fake_engine import FakeEngine

TEXT = b"Glaciers carve U-shaped valleys as the ice grinds slowly downhill."


@pytest.fixture(scope="module")
def embedder():
    embedder = Embedder.load()
    yield embedder
    embedder.close()


def _store_file(file_id: str, vector_store_id: str) -> dict:
    return {
        "id": file_id,
        "object": "vector_store.file",
        "usage_bytes": len(TEXT),
        "created_at": 0,
        "vector_store_id": vector_store_id,
        "status": "in_progress",
        "last_error": None,
        "attributes": {},
        "chunking_strategy": {
            "type": "static",
            "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
        },
    }


def test_ingestion_cut_off_by_a_stop_resumes_at_start(tmp_path, embedder):
    url = f"sqlite:///{tmp_path / 'tokenmill.db'}"

    async def before_the_stop() -> tuple[str, str]:
        store = Store(url)
        files = FileService(store, tmp_path)
        file = await files.create("alice", "glaciers.txt", "assistants", TEXT, "text/plain")
        # Recorded in_progress, as `create` does, but the server stops before ingesting.
        body = {
            "id": "vs_1",
            "object": "vector_store",
            "created_at": 0,
            "name": None,
            "metadata": {},
        }
        await store.call(kb.add_vector_store, "alice", body, [_store_file(file["id"], "vs_1")])
        store.close()
        return file["id"], "vs_1"

    async def after_the_restart(file_id: str, vector_store_id: str) -> dict:
        store = Store(url)
        service = VectorStoreService(store, FileService(store, tmp_path), embedder)
        assert service.resume() == 1
        for _ in range(600):
            body = await service.retrieve_file("alice", vector_store_id, file_id)
            if body["status"] != "in_progress":
                break
            await asyncio.sleep(0.05)
        store.close()
        return body

    file_id, vector_store_id = asyncio.run(before_the_stop())
    body = asyncio.run(after_the_restart(file_id, vector_store_id))
    assert body["status"] == "completed" and body["last_error"] is None
    store = Store(url)
    with store.engine.connect() as conn:
        assert SqliteIndex().count(conn, "alice", vector_store_id, file_id) == 1
    assert kb.unfinished_store_files(store.repo) == []
    store.close()


def test_every_row_belongs_to_its_owner(database_url, embedder):
    store = Store(database_url)
    repo = store.repo
    assert kb.prepare_index(repo) is None
    repo_file = {
        "id": "file_a",
        "object": "file",
        "bytes": len(TEXT),
        "created_at": 0,
        "filename": "a.txt",
        "purpose": "assistants",
    }
    kb.add_file(repo, "alice", repo_file, None)
    kb.add_vector_store(
        repo, "alice", {"id": "vs_a", "name": None, "metadata": {}}, [_store_file("file_a", "vs_a")]
    )
    chunks = asyncio.run(_chunks(embedder))
    assert kb.finish_store_file(repo, "alice", "vs_a", "file_a", chunks, None)
    vector = embedder.encode(["glaciers"]).vectors[0]
    request = SearchRequest(("vs_a",), "glaciers", vector)
    assert [h.file_id for h in kb.search(repo, "alice", request)] == ["file_a"]

    assert kb.get_file(repo, "bob", "file_a") is None
    assert kb.list_files(repo, "bob", Page(), None).items == []
    assert kb.get_vector_store(repo, "bob", "vs_a") is None
    assert kb.get_store_file(repo, "bob", "vs_a", "file_a") is None
    assert kb.list_store_files(repo, "bob", "vs_a", Page(), None) is None
    assert kb.search(repo, "bob", request) == []
    assert not kb.add_store_files(repo, "bob", "vs_a", [_store_file("file_a", "vs_a")])
    assert not kb.delete_store_file(repo, "bob", "vs_a", "file_a")
    assert not kb.delete_file(repo, "bob", "file_a")
    assert not kb.delete_vector_store(repo, "bob", "vs_a")
    assert [h.file_id for h in kb.search(repo, "alice", request)] == ["file_a"]
    store.close()


async def _chunks(embedder: Embedder):
    from orchestrator.retrieval.ingest import prepare_chunks

    return await prepare_chunks(embedder, "file_a", "a.txt", TEXT)


def test_postgresql_serves_vector_stores_and_file_search(
    product_server, postgres, tmp_path, embedder
):
    """The whole round on PostgreSQL (pgvector): index, search, file_search, delete."""
    url = postgres.create_database()
    server = product_server(
        FakeEngine(reply="Glaciers carve valleys.", max_model_len=32_000),
        database_url=url,
        data_dir=tmp_path,
        embedder=embedder,
    )
    client = server.client
    file = client.files.create(file=("glaciers.txt", TEXT), purpose="assistants")
    other = client.files.create(
        file=("bread.txt", b"Sourdough needs a starter."), purpose="assistants"
    )
    store = client.vector_stores.create(file_ids=[file.id, other.id])
    for _ in range(600):
        if client.vector_stores.retrieve(store.id).file_counts.completed == 2:
            break
        time.sleep(0.05)
    hits = client.vector_stores.search(store.id, query="how do valleys form").data
    assert hits[0].file_id == file.id and hits[0].filename == "glaciers.txt"
    response = client.responses.create(
        model="fake-model",
        input="How are valleys carved?",
        include=["file_search_call.results"],
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
        tool_choice="required",
    )
    assert response.output[0].results[0].file_id == file.id
    assert response.output[1].content[0].annotations[0].file_id == file.id
    repo = server.product.store.repo
    with repo.engine.connect() as conn:
        assert kb.index_for(repo).count(conn, "user_local", store.id, file.id) == 1
    assert client.files.delete(file.id).deleted
    with repo.engine.connect() as conn:
        assert kb.index_for(repo).count(conn, "user_local", store.id, file.id) == 0
    assert [h.file_id for h in client.vector_stores.search(store.id, query="valleys").data] == [
        other.id
    ]


def test_a_database_without_pgvector_refuses_vector_stores_clearly(
    product_server, postgres, tmp_path, embedder, monkeypatch
):
    reason = "the PostgreSQL server lacks the pgvector extension"
    monkeypatch.setattr(pg_index, "unavailable_reason", lambda conn: reason)
    server = product_server(
        database_url=postgres.create_database(), data_dir=tmp_path, embedder=embedder
    )
    client = server.client
    file = client.files.create(file=("notes.txt", TEXT), purpose="assistants")
    assert client.files.content(file.id).content == TEXT
    with pytest.raises(openai.APIStatusError) as caught:
        client.vector_stores.create(file_ids=[file.id])
    assert caught.value.status_code == 501 and reason in caught.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="fake-model",
            input="hi",
            tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}],
        )
    assert reason in refused.value.message
    assert client.files.delete(file.id).deleted
    assert not (tmp_path / "files" / file.id).exists()
