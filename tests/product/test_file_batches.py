"""Vector store file batches through the openai SDK: create (file_ids or files), poll,
list the batch's files, cancel while ingestion is held, ownership, bad bodies."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from orchestrator.retrieval.embeddings import Embedder
from orchestrator.store import Page
from orchestrator.store import knowledge as kb
from tests.product.conftest import ProductServer

DOCUMENTS = {
    "glaciers.txt": b"Glaciers carve U-shaped valleys as the ice grinds slowly downhill.",
    "bread.txt": b"A sourdough starter is flour and water fermented by wild yeast.",
}


@pytest.fixture(scope="module")
def embedder():
    embedder = Embedder.load()
    yield embedder
    embedder.close()


class HeldEmbedder:
    """The embedder, but `aencode_metered` (what a vector store embeds with) waits until
    `release` is set: ingestion stays in progress for as long as a test needs."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.release = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def aencode_metered(self, ids: list[list[int]], *args, **options):
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return await self.inner.aencode_metered(ids, *args, **options)


def _server(product_server, tmp_path, embedder) -> tuple[ProductServer, dict[str, str]]:
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    ids = {
        name: server.client.files.create(file=(name, data), purpose="assistants").id
        for name, data in DOCUMENTS.items()
    }
    return server, ids


def test_a_batch_indexes_its_files_and_lists_them(product_server, tmp_path, embedder):
    server, ids = _server(product_server, tmp_path, embedder)
    client = server.client
    store = client.vector_stores.create(name="batches")
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id,
        file_ids=list(ids.values()),
        attributes={"team": "docs"},
        poll_interval_ms=50,
    )
    assert batch.id.startswith("vsfb_") and batch.object == "vector_store.files_batch"
    assert batch.vector_store_id == store.id and batch.status == "completed"
    assert batch.file_counts.completed == 2 and batch.file_counts.total == 2
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id) == batch
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert sorted(f.id for f in listed.data) == sorted(ids.values())
    assert all(f.status == "completed" and f.attributes == {"team": "docs"} for f in listed.data)
    page = client.vector_stores.file_batches.list_files(
        batch.id, vector_store_id=store.id, limit=1, filter="completed"
    )
    assert len(page.data) == 1 and page.has_more
    hits = client.vector_stores.search(store.id, query="glacier valleys").data
    assert hits[0].file_id == ids["glaciers.txt"]
    # Cancelling a batch whose files have all ended cancels nothing: it stays completed.
    assert client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id) == batch
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id) == batch


def test_files_with_their_own_attributes_and_a_failed_batch(product_server, tmp_path, embedder):
    server, ids = _server(product_server, tmp_path, embedder)
    client = server.client
    store = client.vector_stores.create()
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id,
        poll_interval_ms=50,
        files=[
            {"file_id": ids["glaciers.txt"], "attributes": {"topic": "ice"}},
            {"file_id": ids["bread.txt"], "attributes": {"topic": "food"}},
        ],
    )
    assert batch.status == "completed"
    topics = {f.id: f.attributes["topic"] for f in client.vector_stores.files.list(store.id)}
    assert topics == {ids["glaciers.txt"]: "ice", ids["bread.txt"]: "food"}
    image = client.files.create(file=("photo.png", b"\x89PNG\r\n\x1a\n0000"), purpose="assistants")
    failed = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id, file_ids=[image.id], poll_interval_ms=50
    )
    assert failed.status == "failed" and failed.file_counts.failed == 1
    after = client.vector_stores.file_batches.cancel(failed.id, vector_store_id=store.id)
    assert after.status == "failed"
    (only,) = client.vector_stores.file_batches.list_files(failed.id, vector_store_id=store.id).data
    assert only.status == "failed" and only.last_error.code == "unsupported_file"


def _held_batch(product_server, tmp_path, embedder):
    """A batch of the two files whose embedding waits for `held.release`: both stay
    in_progress until the test lets them go."""
    held = HeldEmbedder(embedder)
    server, ids = _server(product_server, tmp_path, held)
    client = server.client
    store = client.vector_stores.create()
    batch = client.vector_stores.file_batches.create(
        vector_store_id=store.id, file_ids=list(ids.values())
    )
    return held, client, store, batch, ids


def test_cancel_stops_the_files_still_in_progress(product_server, tmp_path, embedder):
    held, client, store, batch, ids = _held_batch(product_server, tmp_path, embedder)
    assert batch.status == "in_progress" and batch.file_counts.in_progress == 2
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert cancelled.status == "cancelled"
    assert (cancelled.file_counts.cancelled, cancelled.file_counts.in_progress) == (2, 0)
    held.release.set()
    listed = client.vector_stores.file_batches.list_files(
        batch.id, vector_store_id=store.id, filter="cancelled"
    )
    assert sorted(f.id for f in listed.data) == sorted(ids.values())
    assert client.vector_stores.search(store.id, query="glaciers").data == []
    assert client.vector_stores.retrieve(store.id).file_counts.cancelled == 2


def test_a_filtered_list_pages_on_after_its_cursor_left_the_filter(
    product_server, tmp_path, embedder
):
    """Paging through the files `in_progress`: the last file of a page may be `completed`
    by the time the next page is asked for; its id still marks the place."""
    held, client, store, batch, ids = _held_batch(product_server, tmp_path, embedder)
    pages = [
        client.vector_stores.files.list(store.id, filter="in_progress", limit=1),
        client.vector_stores.file_batches.list_files(
            batch.id, vector_store_id=store.id, filter="in_progress", limit=1
        ),
    ]
    assert all(len(page.data) == 1 and page.has_more for page in pages)
    held.release.set()
    client.vector_stores.file_batches.poll(batch.id, vector_store_id=store.id, poll_interval_ms=50)
    for page in pages:
        following = page.get_next_page()
        assert following.data == [] and not following.has_more
    listed = client.files.list(purpose="assistants", limit=1)
    assert [f.id for f in listed.get_next_page().data] == [ids["glaciers.txt"]]


def test_batches_belong_to_their_owner_and_bad_bodies_are_400(product_server, tmp_path, embedder):
    server, ids = _server(product_server, tmp_path, embedder)
    client = server.client
    store = client.vector_stores.create()
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id, file_ids=[ids["bread.txt"]], poll_interval_ms=50
    )
    repo = server.product.store.repo
    assert kb.get_file_batch(repo, "user_bob", store.id, batch.id) is None
    assert kb.cancel_file_batch(repo, "user_bob", store.id, batch.id) is None
    assert kb.list_batch_files(repo, "user_bob", store.id, batch.id, Page(), None) is None
    assert not kb.add_file_batch(repo, "user_bob", store.id, {"id": "vsfb_x"}, [])
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.retrieve("vsfb_missing", vector_store_id=store.id)
    # in a store that does not exist, the store is what is missing
    file_id = ids["bread.txt"]
    for call in (
        lambda: client.vector_stores.file_batches.retrieve(batch.id, vector_store_id="vs_x"),
        lambda: client.vector_stores.file_batches.cancel(batch.id, vector_store_id="vs_x"),
        lambda: client.vector_stores.file_batches.list_files(batch.id, vector_store_id="vs_x"),
        lambda: client.vector_stores.files.retrieve(file_id, vector_store_id="vs_x"),
        lambda: client.vector_stores.files.content(file_id, vector_store_id="vs_x"),
        lambda: client.vector_stores.files.update(file_id, vector_store_id="vs_x", attributes={}),
        lambda: client.vector_stores.files.delete(file_id, vector_store_id="vs_x"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["param"] == "vector_store_id"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.create(
            vector_store_id="vs_missing", file_ids=[ids["bread.txt"]]
        )
    # an unknown file is named by the field that was sent
    for sent, param in (
        ({"file_ids": [file_id, "file_missing"]}, "file_ids"),
        ({"files": [{"file_id": file_id}, {"file_id": "file_missing"}]}, "files[1].file_id"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            client.vector_stores.file_batches.create(vector_store_id=store.id, **sent)
        assert caught.value.body["param"] == param
    # a batch takes up to 2000 files, as OpenAI's (so these are looked up: not found)
    for many in (
        {"file_ids": [f"file_missing{i}" for i in range(2000)]},
        {"files": [{"file_id": f"file_missing{i}"} for i in range(2000)]},
    ):
        with pytest.raises(openai.NotFoundError):
            client.vector_stores.file_batches.create(vector_store_id=store.id, **many)
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.create(file_ids=["file_missing"])
    assert caught.value.body["param"] == "file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.files.create(vector_store_id=store.id, file_id="file_missing")
    assert caught.value.body["param"] == "file_id"
    url = f"{server.url}/v1/vector_stores/{store.id}/file_batches"
    for body, param in [
        ({}, "file_ids"),
        ({"file_ids": [ids["bread.txt"]], "files": []}, "file_ids"),
        ({"file_ids": []}, "file_ids"),
        ({"file_ids": [f"file_{i}" for i in range(2001)]}, "file_ids"),
        ({"files": [{"file_id": f"file_{i}"} for i in range(2001)]}, "files"),
        ({"files": [{"file_id": 3}]}, "files[0].file_id"),
        ({"files": [{"file_id": ids["bread.txt"]}], "attributes": {}}, "files"),
        # a file's own fields are named under its place in `files`
        ({"files": [ids["bread.txt"]]}, "files[0]"),
        ({"files": [{"file_id": ids["bread.txt"], "purpose": "x"}]}, "files[0].purpose"),
        (
            {"files": [{"file_id": file_id}, {"file_id": file_id, "attributes": {"k": None}}]},
            "files[1].attributes",
        ),
        (
            {"files": [{"file_id": file_id, "chunking_strategy": {"type": "x"}}]},
            "files[0].chunking_strategy",
        ),
    ]:
        raw = httpx.post(url, json=body, timeout=10)
        assert raw.status_code == 400 and raw.json()["error"]["param"] == param, body
    client.vector_stores.delete(store.id)
    assert kb.get_file_batch(repo, "user_local", store.id, batch.id) is None


def test_a_file_added_again_keeps_its_chunks_unless_its_chunking_changes(
    product_server, tmp_path, embedder
):
    """A file already indexed with the same chunking stays `completed` and searchable when
    added again (alone or in a batch, which it joins), takes the add's attributes at once,
    and a cancelled batch leaves it so; one added with another chunking is indexed again,
    and until it is, the store counts and finds nothing of it."""
    held = HeldEmbedder(embedder)
    held.release.set()
    server, ids = _server(product_server, tmp_path, held)
    client, glaciers = server.client, ids["glaciers.txt"]
    store = client.vector_stores.create()
    first = client.vector_stores.files.create_and_poll(
        vector_store_id=store.id, file_id=glaciers, poll_interval_ms=50
    )
    assert first.status == "completed"
    size = client.vector_stores.retrieve(store.id).usage_bytes
    assert size == len(DOCUMENTS["glaciers.txt"])
    held.release.clear()  # from here, anything indexed again stays in progress
    again = client.vector_stores.files.create(
        vector_store_id=store.id, file_id=glaciers, attributes={"topic": "ice"}
    )
    assert (again.status, again.attributes) == ("completed", {"topic": "ice"})
    batch = client.vector_stores.file_batches.create(
        vector_store_id=store.id, file_ids=list(ids.values()), attributes={"topic": "ice"}
    )
    assert (batch.file_counts.completed, batch.file_counts.in_progress) == (1, 1)
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert (cancelled.file_counts.completed, cancelled.file_counts.cancelled) == (1, 1)
    kept = client.vector_stores.retrieve(store.id)
    assert (kept.status, kept.usage_bytes) == ("completed", size)
    assert (kept.file_counts.completed, kept.file_counts.cancelled) == (1, 1)
    held.release.set()  # the search embeds its query
    hits = client.vector_stores.search(
        store.id, query="glacier valleys", filters={"type": "eq", "key": "topic", "value": "ice"}
    ).data
    assert [h.file_id for h in hits] == [glaciers]
    held.release.clear()
    big = {"type": "static", "static": {"max_chunk_size_tokens": 4096, "chunk_overlap_tokens": 0}}
    rechunked = client.vector_stores.file_batches.create(
        vector_store_id=store.id, file_ids=[glaciers], chunking_strategy=big
    )
    assert rechunked.file_counts.in_progress == 1
    client.vector_stores.file_batches.cancel(rechunked.id, vector_store_id=store.id)
    emptied = client.vector_stores.retrieve(store.id)
    assert (emptied.usage_bytes, emptied.file_counts.completed) == (0, 0)
    held.release.set()
    assert client.vector_stores.search(store.id, query="glacier valleys").data == []
