"""Files' `expires_after` (OpenAI's): a file uploaded with it is gone from its `expires_at`
on, for every API, and the sweep deletes it with its bytes and its chunks. The service's
clock is moved instead of waiting an hour."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import FileObject
from sqlalchemy import func, select

from orchestrator import Product, files
from orchestrator.files import FileExpiry
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.store import Page, Store
from orchestrator.store import knowledge as kb
from orchestrator.store.tables import file_blobs, vector_store_files
from server.files import MAX_EXPIRY_SECONDS, MIN_EXPIRY_SECONDS
from tests.product.conftest import ProductServer
from tests.server.fake_engine import FakeEngine

HOUR = {"anchor": "created_at", "seconds": 3600}
GLACIERS = b"Glaciers carve U-shaped valleys as the ice grinds slowly downhill."
BREAD = b"A sourdough starter is flour and water fermented by wild yeast."


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def embedder():
    embedder = Embedder.load()
    yield embedder
    embedder.close()


@pytest.fixture
def server(product_server, tmp_path, embedder) -> ProductServer:
    """A server keeping files and vector stores, its files' clock a `Clock` set to now."""
    server = product_server(
        FakeEngine(reply="Noted.", max_model_len=32_000),
        data_dir=tmp_path / "data",
        embedder=embedder,
    )
    server.product.files.clock = Clock(time.time())
    return server


def _clock(server: ProductServer) -> Clock:
    return server.product.files.clock


def _wait_indexed(client: openai.OpenAI, vector_store_id: str) -> None:
    deadline = time.monotonic() + 60
    while client.vector_stores.retrieve(vector_store_id).file_counts.in_progress:
        assert time.monotonic() < deadline, "indexing did not finish"
        time.sleep(0.05)


def _upload(server: ProductServer, fields: dict) -> httpx.Response:
    """A raw multipart upload of a small file with these extra form fields."""
    return httpx.post(
        f"{server.url}/v1/files",
        data={"purpose": "assistants", **fields},
        files={"file": ("a.txt", b"hello")},
        timeout=30,
    )


def test_a_file_uploaded_with_expires_after_expires_that_long_after_its_creation(server):
    client = server.client
    made = client.files.create(file=("a.txt", b"hello"), purpose="assistants", expires_after=HOUR)
    assert isinstance(made, FileObject) and made.expires_at == made.created_at + 3600
    assert made.created_at == int(_clock(server).now)
    assert client.files.retrieve(made.id).expires_at == made.expires_at
    assert [f.expires_at for f in client.files.list() if f.id == made.id] == [made.expires_at]
    longest = {"anchor": "created_at", "seconds": MAX_EXPIRY_SECONDS}
    assert client.files.create(file=("b.txt", b"x"), purpose="assistants", expires_after=longest)
    forever = client.files.create(file=("c.txt", b"x"), purpose="assistants")
    assert forever.expires_at is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[anchor]": "created_at"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600.0"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "-3600"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": ""}, "seconds"),
        (
            {
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "3600",
                "expires_after[days]": "1",
            },
            "days",
        ),
        ({"expires_after": '{"anchor": "created_at", "seconds": 3600}'}, ""),
    ],
)
def test_a_bad_expires_after_is_a_400_naming_its_field(server, fields, param):
    raw = _upload(server, fields)
    assert raw.status_code == 400, raw.text
    error = raw.json()["error"]
    assert error["param"] == "expires_after" + (f".{param}" if param else "")
    assert error["type"] == "invalid_request_error"
    assert server.client.files.list().data == []  # nothing was stored


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seconds=st.integers(min_value=-10, max_value=10_000_000))
def test_expires_after_seconds_is_taken_within_openais_bounds_only(server, seconds):
    fields = {"expires_after[anchor]": "created_at", "expires_after[seconds]": str(seconds)}
    raw = _upload(server, fields)
    if MIN_EXPIRY_SECONDS <= seconds <= MAX_EXPIRY_SECONDS:
        assert raw.status_code == 200, raw.text
        made = FileObject.model_validate(raw.json())
        assert made.expires_at == made.created_at + seconds
    else:
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "expires_after.seconds"


def test_an_expired_file_is_gone_for_every_api(server):
    client = server.client
    clock = _clock(server)
    doomed = client.files.create(file=("g.txt", GLACIERS), purpose="assistants", expires_after=HOUR)
    kept = client.files.create(file=("b.txt", BREAD), purpose="assistants")
    store = client.vector_stores.create(file_ids=[doomed.id, kept.id])
    _wait_indexed(client, store.id)
    clock.now = doomed.expires_at - 1
    assert client.files.retrieve(doomed.id).id == doomed.id  # the second before: still there
    found = client.vector_stores.search(store.id, query="glaciers valleys ice")
    assert doomed.id in {hit.file_id for hit in found}
    clock.now = doomed.expires_at

    found = client.vector_stores.search(store.id, query="glaciers valleys ice")
    assert {hit.file_id for hit in found} == {kept.id}  # before the sweep deletes its chunks

    for read in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            read(doomed.id)
        assert caught.value.body["code"] == "not_found"
    assert [f.id for f in client.files.list()] == [kept.id]
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.create(file_ids=[doomed.id])
    assert caught.value.body["param"] == "file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.files.create(vector_store_id=store.id, file_id=doomed.id)
    assert caught.value.body["param"] == "file_id"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=[doomed.id])
    assert caught.value.body["param"] == "file_ids"
    part = {"type": "input_file", "file_id": doomed.id}
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="fake-model", input=[{"role": "user", "content": [part]}])
    assert caught.value.body["param"] == "input[0].content[0].file_id"
    assert server.engine.prompts == []
    assert client.vector_stores.retrieve(store.id).file_counts.total == 2  # nothing added


def _counts(server: ProductServer) -> tuple[int, int]:
    """The stored blobs and vector store files, of every owner."""
    with server.product.store.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(file_blobs)).scalar(),
            conn.execute(select(func.count()).select_from(vector_store_files)).scalar(),
        )


def test_the_sweep_deletes_expired_files_with_their_bytes_and_chunks(server):
    client = server.client
    clock = _clock(server)
    doomed = client.files.create(file=("g.txt", GLACIERS), purpose="assistants", expires_after=HOUR)
    kept = client.files.create(file=("b.txt", BREAD), purpose="assistants")
    stores = [client.vector_stores.create(file_ids=[doomed.id, kept.id]) for _ in range(2)]
    for store in stores:
        _wait_indexed(client, store.id)
    found = client.vector_stores.search(stores[0].id, query="glaciers valleys ice")
    assert doomed.id in {hit.file_id for hit in found}
    sweep = server.product.files.delete_expired

    assert asyncio.run(sweep()) == 0 and _counts(server) == (2, 4)
    clock.now = doomed.expires_at
    assert asyncio.run(sweep()) == 1
    assert _counts(server) == (1, 2)
    for store in stores:
        assert client.vector_stores.retrieve(store.id).file_counts.completed == 1
        assert [f.id for f in client.vector_stores.files.list(store.id)] == [kept.id]
        found = client.vector_stores.search(store.id, query="glaciers valleys ice")
        assert {hit.file_id for hit in found} == {kept.id}
    clock.now = 0  # a clock turned back does not bring it back: its row is gone
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(doomed.id)


def test_the_sweep_deletes_many_expired_files_in_several_transactions(server, monkeypatch):
    monkeypatch.setattr(files, "SWEEP_BATCH", 3)
    client = server.client
    made = [
        client.files.create(file=(f"{i}.txt", b"x"), purpose="assistants", expires_after=HOUR)
        for i in range(7)
    ]
    kept = client.files.create(file=("kept.txt", b"x"), purpose="assistants")
    _clock(server).now = max(f.expires_at for f in made)
    assert asyncio.run(server.product.files.delete_expired()) == 7
    assert [f.id for f in client.files.list()] == [kept.id]


def test_the_product_sweeps_expired_files_from_its_start(tmp_path, monkeypatch):
    """`Product.resume` starts the sweep (at once, then every SWEEP_SECONDS) and
    `stop_background` ends it."""
    monkeypatch.setattr(files, "SWEEP_SECONDS", 0.05)
    product = Product.open(FakeEngine(), f"sqlite:///{tmp_path / 'p.db'}", tmp_path)
    clock = product.files.clock = Clock(1_000_000)
    repo = product.store.repo

    async def run() -> None:
        made = await product.files.create("user_local", "a.txt", "assistants", b"x", None)
        doomed = await product.files.create(
            "user_local", "b.txt", "assistants", b"x", None, FileExpiry(3600)
        )
        product.resume()
        await asyncio.sleep(0.2)
        assert kb.get_file(repo, "user_local", doomed["id"], 0) is not None  # not yet expired
        clock.now = doomed["expires_at"]
        deadline = time.monotonic() + 10
        while kb.get_file(repo, "user_local", doomed["id"], 0) is not None:
            assert time.monotonic() < deadline, "the sweep did not delete the expired file"
            await asyncio.sleep(0.05)
        assert [f["id"] for f in kb.list_files(repo, "user_local", Page(), None, 0).items] == [
            made["id"]
        ]
        await product.stop_background()

    try:
        asyncio.run(run())
    finally:
        product.close()


def test_expired_files_are_gone_and_swept_on_every_database(database_url):
    """The repository's reads take `now`: a file is live until the second before its
    `expires_at`; the sweep deletes files expired at its `now` only, of every owner."""
    store = Store(database_url)
    repo = store.repo
    for owner, file_id, expires_at in (("alice", "file_a", 100), ("bob", "file_b", 200)):
        body = {"id": file_id, "purpose": "assistants", "created_at": 0, "expires_at": expires_at}
        kb.add_file(repo, owner, body, None, b"x" * 10)
    kb.add_file(repo, "alice", {**body, "id": "file_c", "expires_at": None}, None, b"x" * 10)
    try:
        assert kb.get_file(repo, "alice", "file_a", 99) is not None
        assert kb.get_file(repo, "alice", "file_a", 100) is None
        assert kb.file_content(repo, "alice", "file_a", 100) is None
        assert kb.storage_used(repo, "alice", 99) == 20
        assert kb.storage_used(repo, "alice", 100) == 10  # expired files take no quota
        listed = kb.list_files(repo, "alice", Page(), None, 100).items
        assert [f["id"] for f in listed] == ["file_c"]
        assert not kb.delete_file(repo, "alice", "file_a", 100)
        assert kb.delete_expired_files(repo, 99, 10) == []
        assert kb.delete_expired_files(repo, 200, 10) == [("alice", "file_a"), ("bob", "file_b")]
        assert kb.get_file(repo, "alice", "file_a", 0) is None
        assert kb.get_file(repo, "alice", "file_c", 10**12) is not None  # never expires
        with store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(file_blobs)).scalar() == 1
    finally:
        store.close()
