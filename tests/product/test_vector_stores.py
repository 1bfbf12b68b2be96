"""Files and vector stores below the HTTP layer: ingestion resumed after a restart,
ownership, and PostgreSQL (files yes, vector stores refused with a clear error)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from orchestrator import FileService, VectorStoreService
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.retrieval.index import SearchRequest, SqliteIndex
from orchestrator.store import Page, Store
from orchestrator.store import knowledge as kb

TEXT = b"Glaciers carve U-shaped valleys as the ice grinds slowly downhill."


@pytest.fixture(scope="module")
def embedder():
    embedder = Embedder.load()
    yield embedder
    embedder.close()


def _store_file(file_id: str, vector_store_id: str) -> dict:
    return {"id": file_id, "object": "vector_store.file", "usage_bytes": len(TEXT),
            "created_at": 0, "vector_store_id": vector_store_id, "status": "in_progress",
            "last_error": None, "attributes": {},
            "chunking_strategy": {"type": "static", "static": {
                "max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}}


def test_ingestion_cut_off_by_a_stop_resumes_at_start(tmp_path, embedder):
    url = f"sqlite:///{tmp_path / 'tokenmill.db'}"

    async def before_the_stop() -> tuple[str, str]:
        store = Store(url)
        files = FileService(store, tmp_path)
        file = await files.create("alice", "glaciers.txt", "assistants", TEXT, "text/plain")
        # Recorded in_progress, as `create` does, but the server stops before ingesting.
        body = {"id": "vs_1", "object": "vector_store", "created_at": 0, "name": None,
                "metadata": {}}
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


def test_every_row_belongs_to_its_owner(tmp_path, embedder):
    store = Store(f"sqlite:///{tmp_path / 'tokenmill.db'}")
    repo = store.repo
    repo_file = {"id": "file_a", "object": "file", "bytes": len(TEXT), "created_at": 0,
                 "filename": "a.txt", "purpose": "assistants"}
    kb.add_file(repo, "alice", repo_file, None)
    kb.add_vector_store(repo, "alice", {"id": "vs_a", "name": None, "metadata": {}},
                        [_store_file("file_a", "vs_a")])
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


def test_postgresql_serves_files_and_refuses_vector_stores_clearly(product_server, postgres,
                                                                   tmp_path, embedder):
    server = product_server(database_url=postgres.create_database(), data_dir=tmp_path,
                            embedder=embedder)
    client = server.client
    file = client.files.create(file=("notes.txt", TEXT), purpose="assistants")
    assert client.files.content(file.id).content == TEXT
    assert [f.id for f in client.files.list()] == [file.id]
    with pytest.raises(openai.APIStatusError) as caught:
        client.vector_stores.create(file_ids=[file.id])
    assert caught.value.status_code == 501
    assert "not supported on PostgreSQL yet" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        client.vector_stores.search("vs_any", query="glaciers")
    assert caught.value.status_code == 501
    assert client.files.delete(file.id).deleted
    assert not (tmp_path / "files" / file.id).exists()
