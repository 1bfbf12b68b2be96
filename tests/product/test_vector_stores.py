"""Files and vector stores below the HTTP layer: ingestion resumed after a restart,
ownership on both databases, and the whole round on PostgreSQL (pgvector), or a clear
refusal where it lacks pgvector."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import openai
import pytest
from openai.pagination import SyncCursorPage
from openai.types.conversations import Conversation
from sqlalchemy import func, select

from orchestrator import FileService, Product, VectorStoreService, slots, vector_stores
from orchestrator.retrieval import ingest, pg_index
from orchestrator.retrieval.chunking import StaticChunking
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.retrieval.index import SearchRequest
from orchestrator.store import Page, Store
from orchestrator.store import knowledge as kb
from orchestrator.store.advisory_claims import AdvisoryClaims, claim_key
from orchestrator.store.tables import file_blobs, files
from orchestrator.vector_stores import FileToAdd, Search
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


def _open(url: str) -> Store:
    store = Store(url)
    assert kb.prepare_index(store.repo) is None
    return store


async def _left_in_progress(url: str, tmp_path) -> tuple[str, str]:
    """A file recorded in_progress in a vector store, as `create` does, by a server that
    then stopped before ingesting it."""
    store = _open(url)
    files = FileService(store)
    file = await files.create("alice", "glaciers.txt", "assistants", TEXT, "text/plain")
    body = {
        "id": "vs_1",
        "object": "vector_store",
        "created_at": 0,
        "name": None,
        "metadata": {},
        "last_active_at": 0,
        "expires_after": None,
    }
    await store.call(kb.add_vector_store, "alice", body, [_store_file(file["id"], "vs_1")])
    store.close()
    return file["id"], "vs_1"


async def _status_after(service: VectorStoreService, file_id: str, seconds: float) -> str:
    """The file's status once it left in_progress, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        body = await service.retrieve_file("alice", "vs_1", file_id)
        if body["status"] != "in_progress" or time.monotonic() > deadline:
            return body["status"]
        await asyncio.sleep(0.05)


def test_ingestion_cut_off_by_a_stop_resumes_at_start(database_url, tmp_path, embedder):
    async def after_the_restart(file_id: str) -> str:
        store = _open(database_url)
        service = VectorStoreService(store, FileService(store), embedder)
        assert service.resume() == 1
        status = await _status_after(service, file_id, 30)
        query = Search("glaciers carving valleys", None, 5, 0.0, "hybrid")
        hits = await service.search_stores("alice", ["vs_1"], [query])
        assert [hit.file_id for hit in hits] == [file_id]
        store.close()
        return status

    file_id, _ = asyncio.run(_left_in_progress(database_url, tmp_path))
    assert asyncio.run(after_the_restart(file_id)) == "completed"
    store = Store(database_url)
    assert kb.unfinished_store_files(store.repo) == []
    store.close()


def _terminate_claimants(repo) -> None:
    """What a crash does to a server's claims: PostgreSQL ends its sessions (and then, a
    moment later, their locks are gone)."""
    claimants = (
        "FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with repo.engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend(pid) {claimants}")
    deadline = time.monotonic() + 10
    while True:
        with repo.engine.connect() as conn:
            if not conn.exec_driver_sql(f"SELECT count(*) {claimants}").scalar():
                return
        assert time.monotonic() < deadline, "the terminated session kept its lock"
        time.sleep(0.02)


def test_a_file_another_server_is_ingesting_is_left_to_it(
    postgres, tmp_path, embedder, monkeypatch
):
    """PostgreSQL may be shared: a restarting server resumes only the files no live server
    has claimed, and its sweep resumes one whose claimant died (its session gone)."""
    monkeypatch.setattr(vector_stores, "SWEEP_SECONDS", 0.1)
    url = postgres.create_database()

    async def restart_beside_a_live_server(file_id: str) -> tuple[str, str]:
        store = _open(url)
        other_server, key = AdvisoryClaims(), claim_key("alice", "vs_1", file_id)
        other_store = Store(url)
        assert await other_store.call(other_server.claim, key)
        service = VectorStoreService(store, FileService(store), embedder)
        assert service.resume() == 1
        service.start_sweeping()
        while_claimed = await _status_after(service, file_id, 3)
        await store.call(_terminate_claimants)  # the other server dies, and its sessions
        other_store.close()
        after = await _status_after(service, file_id, 30)
        service.cancel()
        store.close()
        return while_claimed, after

    file_id, _ = asyncio.run(_left_in_progress(url, tmp_path))
    assert asyncio.run(restart_beside_a_live_server(file_id)) == ("in_progress", "completed")


async def _until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_ingestion_takes_a_few_files_at_once_and_owners_in_turn(tmp_path, embedder, monkeypatch):
    """Each file ingested holds its bytes and text in memory, so a server ingests at most
    INGEST_SLOTS files at once, and one owner at most INGEST_SLOTS_PER_OWNER: another
    owner's file added after two large batches is among the next to start. Cancelling a
    batch drops its files still waiting, and every other file completes."""
    gate = asyncio.Event()  # holds every extraction until the test lets them go
    started: list[str] = []
    inside: Counter[str] = Counter()  # owner -> files in extraction now
    most: Counter[str] = Counter()  # owner (or "all") -> most files in extraction at once

    async def extract(data: bytes, filename: str, content_type: str | None) -> str:
        owner = filename.split("-")[0]
        started.append(filename)
        inside[owner] += 1
        most[owner] = max(most[owner], inside[owner])
        most["all"] = max(most["all"], inside.total())
        try:
            await gate.wait()
        finally:
            inside[owner] -= 1
        return data.decode()

    monkeypatch.setattr(ingest, "extract_text", extract)

    async def batch(service: VectorStoreService, owner: str, count: int) -> tuple[str, str]:
        store_id = (await service.create(owner, None, {}, []))["id"]
        added = [
            FileToAdd(
                (await service.files.create(owner, f"{owner}-{i}.txt", "assistants", TEXT, None))[
                    "id"
                ],
                StaticChunking(),
                {},
                "file_ids",
            )
            for i in range(count)
        ]
        return store_id, (await service.create_file_batch(owner, store_id, added))["id"]

    async def run() -> dict[str, dict]:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        alice = await batch(service, "alice", 10)
        carol = await batch(service, "carol", 10)
        await _until(lambda: inside.total() >= slots.INGEST_SLOTS)
        bob = await batch(service, "bob", 1)
        await service.cancel_file_batch("carol", *carol)
        gate.set()
        batches = {"alice": alice, "bob": bob, "carol": carol}

        async def counts() -> dict[str, dict]:
            return {
                owner: (await service.retrieve_file_batch(owner, *ids))["file_counts"]
                for owner, ids in batches.items()
            }

        await _until(lambda: not service._tasks)
        found = await counts()
        store.close()
        return found

    counts = asyncio.run(run())
    assert counts["alice"]["completed"] == 10
    assert counts["bob"]["completed"] == 1
    assert counts["carol"]["cancelled"] == 10
    assert most["all"] == slots.INGEST_SLOTS
    assert most["alice"] == most["carol"] == slots.INGEST_SLOTS_PER_OWNER
    assert started.index("bob-0.txt") == slots.INGEST_SLOTS  # the next to start
    assert sum(name.startswith("carol") for name in started) == 2  # none after the cancel


class _LockClaims:
    """Claims as PostgreSQL's advisory locks hold them (one holder of a key at a time),
    each taken and let go on the store's thread, the letting go a little slow."""

    def __init__(self) -> None:
        self.held: set[int] = set()

    def claim(self, repo, key: int) -> bool:
        if key in self.held:
            return False
        self.held.add(key)
        return True

    def release(self, repo, key: int) -> None:
        time.sleep(0.02)
        self.held.discard(key)


def test_a_file_added_again_and_again_at_once_is_ingested_and_let_go(tmp_path, embedder):
    """Each add of a file stops its ingestion under way: the stopped one lets go of its
    claim, however often it is stopped, before the next one takes it, so the last one
    ingests the file and no claim stays held (on PostgreSQL a kept claim held the file in
    progress until the server restarted)."""

    async def run() -> tuple[list[str], set[int]]:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        claims = service._claims = _LockClaims()
        ids = [
            (await service.files.create("alice", f"{i}.txt", "assistants", TEXT, None))["id"]
            for i in range(3)
        ]
        added = [FileToAdd(i, StaticChunking(), {}, "file_ids") for i in ids]
        store_id = (await service.create("alice", None, {}, []))["id"]
        await asyncio.gather(*(service.add_file("alice", store_id, added[0]) for _ in range(16)))
        await asyncio.gather(
            *(service.create_file_batch("alice", store_id, added) for _ in range(8))
        )
        await _until(lambda: not service._tasks)
        statuses = [(await service.retrieve_file("alice", store_id, i))["status"] for i in ids]
        store.close()
        return statuses, claims.held

    statuses, held = asyncio.run(run())
    assert statuses == ["completed"] * 3
    assert held == set()


def test_ingestion_embeds_in_the_background_and_searches_do_not(tmp_path, embedder, monkeypatch):
    """A file's chunks are embedded as background work on the embedder's thread, which
    lets a search's query (interactive) go before them."""
    queued: list[tuple[str, bool]] = []

    def recording(name: str):
        inner = getattr(embedder, name)

        def call(inputs, *args, background=False):
            queued.append((name, background))
            return inner(inputs, *args, background=background)

        return call

    for name in ("atokenize", "aencode_metered"):
        monkeypatch.setattr(embedder, name, recording(name))

    async def run() -> None:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        file = await service.files.create("alice", "g.txt", "assistants", TEXT, None)
        added = FileToAdd(file["id"], StaticChunking(), {}, "file_ids")
        store_id = (await service.create("alice", None, {}, [added]))["id"]
        await _until(lambda: not service._tasks)
        assert queued == [("atokenize", True), ("aencode_metered", True)]
        queued.clear()
        query = Search("glaciers", None, 5, 0.0, "hybrid")
        assert await service.search_stores("alice", [store_id], [query])
        assert queued == [("atokenize", False), ("aencode_metered", False)]
        store.close()

    asyncio.run(run())


def test_deleting_a_file_stops_its_ingestion_in_every_store(tmp_path, embedder, monkeypatch):
    """A file deleted while vector stores ingest it leaves them: its ingestions, running
    or waiting for a slot, stop at once (none reads on to a write that would be
    refused), and its rows are gone."""
    extracting: list[str] = []
    cancelled: list[str] = []

    async def held(data: bytes, filename: str, content_type: str | None) -> str:
        extracting.append(filename)
        try:
            await asyncio.Event().wait()  # never set: only a cancellation ends it
        except asyncio.CancelledError:
            cancelled.append(filename)
            raise
        return data.decode()

    monkeypatch.setattr(ingest, "extract_text", held)

    async def run() -> tuple[list, list]:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        file_id = (await service.files.create("alice", "a.txt", "assistants", TEXT, None))["id"]
        added = FileToAdd(file_id, StaticChunking(), {}, "file_ids")
        stores = [(await service.create("alice", None, {}, [added]))["id"] for _ in range(3)]
        await _until(lambda: len(extracting) == slots.INGEST_SLOTS_PER_OWNER)
        await service.files.delete("alice", file_id)
        await _until(lambda: not service._tasks, seconds=5)
        rows = [(await service.list_files("alice", s, Page(), None)).items for s in stores]
        store.close()
        return cancelled, rows

    cancelled_files, rows = asyncio.run(run())
    assert cancelled_files == extracting == ["a.txt", "a.txt"]  # the third never started
    assert rows == [[], [], []]


def _embedding_recorded(embedder, monkeypatch) -> list[int]:
    """The tokens of each job the embedder runs, one input per job, as they run."""
    embedded: list[int] = []
    encode_ids = embedder.encode_ids

    def counting(ids, *args, **kwargs):
        embedded.append(sum(len(seq) for seq in ids))
        return encode_ids(ids, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode_ids", counting)
    monkeypatch.setattr(embedder, "batch_size", 1)
    return embedded


def test_an_ingestion_stopped_mid_way_is_charged_what_went_to_the_embedder(
    tmp_path, embedder, monkeypatch
):
    """A file removed while its chunks are being embedded stops its ingestion; the chunks
    already embedded were computed for the owner, so its usage row charges their tokens
    (counted as they go to the embedder, as /v1/embeddings does), not 0, nor the tokens
    of the chunks never embedded."""
    embedded = _embedding_recorded(embedder, monkeypatch)
    text = " ".join(f"Glacier number {i} carved valley {i} slowly." for i in range(400))
    chunking = StaticChunking(100, 0)
    chunks = ingest.split_text(text, "g.txt", embedder, chunking)
    rows: list = []

    async def run() -> None:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        service.usage_listeners.append(rows.append)
        file_id = (await service.files.create("alice", "g.txt", "assistants", text.encode(), None))[
            "id"
        ]
        await service.create("alice", None, {}, [FileToAdd(file_id, chunking, {}, "file_ids")])
        await _until(lambda: embedded)
        await service.files.delete("alice", file_id)
        await _until(lambda: not service._tasks)
        store.close()

    asyncio.run(run())
    assert len(embedded) < len(chunks)  # stopped mid-way
    [row] = rows
    assert (row.endpoint, row.status, row.output_tokens) == ("vector_stores.files", "cancelled", 0)
    # the chunks embedded, and at most the next one (queued as it stopped), not the file's
    most = max(len(ids) for ids in embedder.tokenize([c.text for c in chunks]))
    assert 0 < sum(embedded) <= row.input_tokens <= sum(embedded) + most


def test_a_search_cancelled_mid_way_is_charged_what_went_to_the_embedder(
    tmp_path, embedder, monkeypatch
):
    """The same for a search's queries (its client gone): the queries embedded before the
    cancellation are charged, the row says `cancelled`."""
    embedded = _embedding_recorded(embedder, monkeypatch)
    queries = [f"where did glacier {i} carve its valley" for i in range(64)]
    rows: list = []

    async def run() -> None:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        service.usage_listeners.append(rows.append)
        store_id = (await service.create("alice", None, {}, []))["id"]
        searches = [Search(q, None, 5, 0.0, "hybrid") for q in queries]
        task = asyncio.create_task(service.search_stores("alice", [store_id], searches))
        await _until(lambda: embedded)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()

    asyncio.run(run())
    assert len(embedded) < len(queries)
    [row] = rows
    assert (row.endpoint, row.status) == ("vector_stores.search", "cancelled")
    most = max(len(ids) for ids in embedder.tokenize(queries))
    assert 0 < sum(embedded) <= row.input_tokens <= sum(embedded) + most


def test_a_file_whose_index_cannot_be_stored_fails_rather_than_stays_in_progress(
    tmp_path, embedder, monkeypatch
):
    """A write of the chunks the database refuses (the error is not its absence) fails
    the file with a last_error: left in progress, every sweep would fail on it again."""
    finish = kb.finish_store_file

    def refusing_chunks(repo, owner, store_id, file_id, chunks, *rest):
        if chunks:
            raise ValueError("the database refused a chunk")
        return finish(repo, owner, store_id, file_id, chunks, *rest)

    monkeypatch.setattr(kb, "finish_store_file", refusing_chunks)

    async def run() -> dict:
        store = _open(f"sqlite:///{tmp_path / 'tokenmill.db'}")
        service = VectorStoreService(store, FileService(store), embedder)
        file_id = (await service.files.create("alice", "a.txt", "assistants", TEXT, None))["id"]
        added = FileToAdd(file_id, StaticChunking(), {}, "file_ids")
        store_id = (await service.create("alice", None, {}, [added]))["id"]
        await _until(lambda: not service._tasks)
        found = await service.retrieve_file("alice", store_id, file_id)
        store.close()
        return found

    found = asyncio.run(run())
    assert found["status"] == "failed"
    assert found["last_error"]["code"] == "server_error"


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
        "expires_at": None,
    }
    kb.add_file(repo, "alice", repo_file, None, TEXT)
    body = {"id": "vs_a", "name": None, "metadata": {}, "last_active_at": 0, "expires_after": None}
    kb.add_vector_store(repo, "alice", body, [_store_file("file_a", "vs_a")])
    chunks = asyncio.run(_chunks(embedder))
    assert kb.finish_store_file(repo, "alice", "vs_a", "file_a", chunks, None)
    vector = embedder.encode(["glaciers"]).vectors[0]
    request = SearchRequest(("vs_a",), "glaciers", vector)
    assert [h.file_id for h in kb.search(repo, "alice", request, 0)] == ["file_a"]

    assert kb.get_file(repo, "bob", "file_a", 0) is None
    assert kb.file_content(repo, "bob", "file_a", 0) is None
    assert kb.file_content(repo, "alice", "file_a", 0)[2] == TEXT
    assert kb.list_files(repo, "bob", Page(), None, 0).items == []
    assert kb.get_vector_store(repo, "bob", "vs_a") is None
    assert not kb.mark_vector_store_active(repo, "bob", "vs_a", 1)
    assert not kb.update_vector_store(repo, "bob", "vs_a", {"expires_after": None})
    expiry = {"anchor": "last_active_at", "days": 1}
    assert kb.update_vector_store(repo, "alice", "vs_a", {"expires_after": expiry})
    assert kb.mark_vector_store_active(repo, "alice", "vs_a", kb.DAY - 1)
    assert not kb.mark_vector_store_active(repo, "alice", "vs_a", 2 * kb.DAY - 1)  # expired
    assert kb.get_vector_store(repo, "alice", "vs_a")[0]["last_active_at"] == kb.DAY - 1
    assert kb.get_store_file(repo, "bob", "vs_a", "file_a") is None
    assert kb.list_store_files(repo, "bob", "vs_a", Page(), None) is None
    assert kb.search(repo, "bob", request, 0) == []
    assert not kb.add_store_files(repo, "bob", "vs_a", [_store_file("file_a", "vs_a")])
    assert not kb.delete_store_file(repo, "bob", "vs_a", "file_a")
    assert not kb.delete_file(repo, "bob", "file_a", 0)
    assert kb.file_content(repo, "alice", "file_a", 0)[2] == TEXT
    assert not kb.delete_vector_store(repo, "bob", "vs_a")
    assert [h.file_id for h in kb.search(repo, "alice", request, 0)] == ["file_a"]
    assert kb.delete_file(repo, "alice", "file_a", 0)  # the bytes go with the row
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(file_blobs)).scalar() == 0
    store.close()


def test_a_use_moves_last_active_at_at_most_once_a_minute(database_url):
    """A use finds the store usable, expired or not the owner's; it writes `last_active_at`
    only once `ACTIVE_EVERY` seconds have passed since it last moved."""
    store = Store(database_url)
    repo = store.repo
    expiry = {"anchor": "last_active_at", "days": 1}
    body = {"id": "vs_a", "name": None, "metadata": {}, "last_active_at": 1000}
    kb.add_vector_store(repo, "alice", {**body, "expires_after": expiry}, [])

    def last_active() -> int:
        return kb.get_vector_store(repo, "alice", "vs_a")[0]["last_active_at"]

    try:
        assert kb.mark_vector_store_active(repo, "alice", "vs_a", 1000 + kb.ACTIVE_EVERY - 1)
        assert last_active() == 1000  # usable, and not written within the minute
        assert kb.mark_vector_store_active(repo, "alice", "vs_a", 1000 + kb.ACTIVE_EVERY)
        moved = last_active()
        assert moved == 1000 + kb.ACTIVE_EVERY
        assert kb.mark_vector_store_active(repo, "alice", "vs_a", moved + kb.DAY - 1) is True
        assert last_active() == moved + kb.DAY - 1
        expired = last_active() + kb.DAY
        assert kb.mark_vector_store_active(repo, "alice", "vs_a", expired) is False
        assert last_active() == expired - kb.DAY  # a refused use does not revive it
        assert kb.mark_vector_store_active(repo, "bob", "vs_a", 1000) is None
        kb.update_vector_store(repo, "alice", "vs_a", {"expires_after": None})
        assert kb.mark_vector_store_active(repo, "alice", "vs_a", expired) is True
    finally:
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


def test_servers_sharing_a_database_read_each_others_files(
    product_server, postgres, tmp_path, embedder
):
    """A file's bytes live in the database: uploaded through one server, read and
    indexed through another with its own data directory."""
    url = postgres.create_database()
    first, second = (
        product_server(database_url=url, data_dir=tmp_path / name, embedder=embedder)
        for name in ("a", "b")
    )
    file = first.client.files.create(file=("glaciers.txt", TEXT), purpose="assistants")
    assert second.client.files.content(file.id).content == TEXT
    store = second.client.vector_stores.create(file_ids=[file.id])
    for _ in range(600):
        if second.client.vector_stores.retrieve(store.id).file_counts.completed == 1:
            break
        time.sleep(0.05)
    hits = first.client.vector_stores.search(store.id, query="how do valleys form").data
    assert [h.file_id for h in hits] == [file.id]


def test_files_an_earlier_version_kept_on_disk_move_into_the_store(tmp_path):
    """Bytes under <data dir>/files/<id> (the earlier layout) are read into the store at
    start, and the folder goes; a write a crash cut short, or a deleted file's leftover,
    is dropped."""
    url = f"sqlite:///{tmp_path / 'product.db'}"
    store = Store(url)
    body = {"id": "file_old", "object": "file", "bytes": len(TEXT), "purpose": "assistants"}
    with store.engine.begin() as conn:  # the row as the earlier version wrote it
        conn.execute(
            files.insert().values(id="file_old", owner_id="alice", purpose="assistants", body=body)
        )
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "file_old").write_bytes(TEXT)
    (folder / "file_gone").write_bytes(b"deleted since")
    (folder / "file_cut.partial").write_bytes(b"half")
    store.close()
    product = Product.open(FakeEngine(), url, tmp_path)
    try:
        assert not folder.exists()
        assert kb.file_content(product.store.repo, "alice", "file_old", 0)[2] == TEXT
        assert kb.file_content(product.store.repo, "alice", "file_gone", 0) is None
    finally:
        product.close()


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
    with server.product.store.engine.connect() as conn:  # its bytes went with it
        assert conn.execute(select(func.count()).select_from(file_blobs)).scalar() == 0


def test_an_id_holding_a_nul_is_not_found_on_every_database(
    product_server, database_url, tmp_path, embedder
):
    """PostgreSQL refuses a NUL in a text parameter; no id holds one, so a file, store or
    batch id with a NUL (in a path, a cursor or a body) is a 404 like any unknown id."""
    server = product_server(database_url=database_url, data_dir=tmp_path, embedder=embedder)
    store = server.client.vector_stores.create(name="empty").id
    requests = [
        ("GET", "/files/file_%00", None),
        ("GET", "/files/file_%00/content", None),
        ("DELETE", "/files/file_%00", None),
        ("GET", "/files?after=file_%00", None),
        ("GET", "/vector_stores/vs_%00", None),
        ("DELETE", "/vector_stores/vs_%00", None),
        ("GET", "/vector_stores?before=vs_%00", None),
        ("POST", "/vector_stores", {"file_ids": ["file_\x00"]}),
        ("POST", f"/vector_stores/{store}/files", {"file_id": "file_\x00"}),
        ("GET", f"/vector_stores/{store}/files/file_%00", None),
        ("DELETE", f"/vector_stores/{store}/files/file_%00", None),
        ("GET", f"/vector_stores/{store}/files?after=file_%00", None),
        ("GET", f"/vector_stores/{store}/file_batches/vsfb_%00", None),
        ("POST", f"/vector_stores/{store}/file_batches", {"file_ids": ["file_\x00"]}),
    ]
    for method, path, body in requests:
        raw = httpx.request(method, f"{server.url}/v1{path}", json=body, timeout=10)
        assert raw.status_code == 404, (method, path, raw.text)


def test_attributes_and_filters_holding_a_nul_are_400_on_every_database(
    product_server, database_url, tmp_path, embedder
):
    """The chunks' attributes are PostgreSQL's jsonb, which cannot hold a NUL: an attribute
    with one is refused where it is given (it left the file in_progress for good there),
    and so is a filter comparing with one (a 500 there), on both databases alike."""
    server = product_server(database_url=database_url, data_dir=tmp_path, embedder=embedder)
    file = server.client.files.create(file=("glaciers.txt", TEXT), purpose="assistants")
    store = server.client.vector_stores.create(name="empty").id
    base = f"{server.url}/v1/vector_stores/{store}"
    for attributes in ({"topic": "ice\x00"}, {"to\x00pic": "ice"}):
        raw = httpx.post(f"{base}/files", json={"file_id": file.id, "attributes": attributes})
        assert (raw.status_code, raw.json()["error"]["param"]) == (400, "attributes"), raw.text
    for comparison in (
        {"type": "eq", "key": "topic", "value": "ice\x00"},
        {"type": "nin", "key": "topic", "value": ["rock", "ice\x00"]},
        {"type": "eq", "key": "to\x00pic", "value": "ice"},
    ):
        raw = httpx.post(f"{base}/search", json={"query": "ice", "filters": comparison})
        assert (raw.status_code, raw.json()["error"]["param"]) == (400, "filters"), raw.text


def test_deleting_each_item_while_paging_through_a_list_deletes_them_all(
    product_server, tmp_path, embedder
):
    """The SDK's auto-pagination asks for the next page after the last item of the previous
    one, which the loop has just deleted: each list pages on from where that item was, as
    OpenAI's API does, so the commonest cleanup loop empties every list."""
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    client = server.client
    file_ids = [
        client.files.create(file=(f"f{i}.txt", TEXT), purpose="assistants").id for i in range(5)
    ]
    store = client.vector_stores.create(file_ids=file_ids)
    batch = client.vector_stores.file_batches.create(store.id, file_ids=file_ids)
    for _ in range(4):
        client.vector_stores.create()
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": str(i)} for i in range(5)]
    )
    for _ in range(4):
        client.conversations.create()

    def emptied(pages, delete, remaining) -> None:
        for item in pages:
            delete(item.id)
        assert [item.id for item in remaining()] == []

    emptied(
        client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, limit=2),
        lambda i: client.vector_stores.files.delete(i, vector_store_id=store.id),
        lambda: client.vector_stores.files.list(store.id),
    )
    client.vector_stores.file_batches.create(store.id, file_ids=file_ids)
    emptied(
        client.vector_stores.files.list(store.id, limit=2),
        lambda i: client.vector_stores.files.delete(i, vector_store_id=store.id),
        lambda: client.vector_stores.files.list(store.id),
    )
    emptied(client.files.list(limit=2), client.files.delete, client.files.list)
    emptied(
        client.vector_stores.list(limit=2), client.vector_stores.delete, client.vector_stores.list
    )
    emptied(
        client.conversations.items.list(conversation.id, limit=2),
        lambda i: client.conversations.items.delete(i, conversation_id=conversation.id),
        lambda: client.conversations.items.list(conversation.id),
    )

    def conversations(limit: int = 20):  # tokenmill's own list, paged as OpenAI's lists are
        return client.get_api_list(
            "/conversations",
            model=Conversation,
            page=SyncCursorPage[Conversation],
            options={"params": {"limit": limit}},
        )

    emptied(conversations(limit=2), client.conversations.delete, conversations)
