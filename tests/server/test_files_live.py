"""Files and vector stores through the openai SDK against one `python -m engine.serve`:
upload, index in the background, search, failures, limits and deletion."""

from __future__ import annotations

import base64
import io
import signal
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
from sqlalchemy import text

from orchestrator.retrieval.index import sqlite_vec_engine
from tests.server.live_server import API_KEY, start_server
from tests.test_examples import run_example

UPLOAD_LIMIT_MB = 1


def tiny_pdf(sentence: str) -> bytes:
    """A one-page PDF whose text is `sentence` (Helvetica, one text object)."""
    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
    )
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 12 Tf 72 720 Td ({sentence}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


DOCUMENTS = {
    "volcanoes.txt": (
        b"Volcanoes erupt when magma rises through the crust. Basalt lava flows "
        b"are runny, while andesite lava builds steep stratovolcanoes.",
        "how does magma make a volcano erupt",
    ),
    "bread.md": (
        b"# Sourdough\n\nA sourdough starter is flour and water fermented by wild "
        b"yeast and lactobacilli. Feed the starter daily before baking the loaf.",
        "feeding a sourdough starter",
    ),
    "borrow.html": (
        b"<html><head><style>p{color:red}</style></head><body><h1>Rust</h1><p>The "
        b"borrow checker rejects a mutable reference while shared references to the "
        b"same value are alive.</p></body></html>",
        "rust borrow checker mutable reference",
    ),
    "aurora.pdf": (
        tiny_pdf(
            "The aurora borealis glows green when solar wind particles strike "
            "oxygen atoms high in the atmosphere."
        ),
        "why is the northern lights aurora green",
    ),
}


@pytest.fixture(scope="module")
def live():
    server = start_server(
        "--api-key",
        API_KEY,
        "--compile",
        "off",
        "--dtype",
        "float32",
        "--max-upload-mb",
        str(UPLOAD_LIMIT_MB),
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def uploaded(client) -> dict[str, str]:
    """Every document and an unsupported file, uploaded: filename -> file id."""
    ids = {}
    for name, (data, _) in {**DOCUMENTS, "photo.png": (b"\x89PNG\r\n\x1a\n0000", "")}.items():
        ids[name] = client.files.create(file=(name, data), purpose="assistants").id
    return ids


def _wait_indexed(client: openai.OpenAI, vector_store_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        store = client.vector_stores.retrieve(vector_store_id)
        if store.file_counts.in_progress == 0:
            return store
        assert time.monotonic() < deadline, "indexing did not finish in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def vector_store(client, uploaded):
    store = client.vector_stores.create(
        name="knowledge", file_ids=list(uploaded.values()), metadata={"team": "docs"}
    )
    assert store.status in ("in_progress", "completed")
    assert store.file_counts.total == len(uploaded)
    return _wait_indexed(client, store.id)


def _chunk_rows(live, file_id: str) -> tuple[int, int, int]:
    """(chunks, vectors, full-text rows) the server's index holds for the file."""
    engine = sqlite_vec_engine(f"sqlite:///{Path(live.scratch_dir) / 'tokenmill.db'}")
    try:
        with engine.connect() as conn:
            chunk_ids = (
                conn.execute(
                    text("SELECT id FROM retrieval_chunks WHERE file_id = :f"), {"f": file_id}
                )
                .scalars()
                .all()
            )
            vectors = conn.execute(
                text(
                    "SELECT count(*) FROM retrieval_vectors WHERE id IN "
                    "(SELECT value FROM json_each(:ids))"
                ),
                {"ids": str(chunk_ids)},
            ).scalar_one()
            words = conn.execute(
                text(
                    "SELECT count(*) FROM retrieval_chunks_fts_docsize WHERE id IN "
                    "(SELECT value FROM json_each(:ids))"
                ),
                {"ids": str(chunk_ids)},
            ).scalar_one()
        return len(chunk_ids), vectors, words
    finally:
        engine.dispose()


def test_files_are_listed_retrieved_and_returned_byte_for_byte(client, uploaded):
    listed = {f.id: f for f in client.files.list(limit=100)}
    for name, file_id in uploaded.items():
        assert listed[file_id].filename == name
        assert listed[file_id].purpose == "assistants"
    name = "aurora.pdf"
    got = client.files.retrieve(uploaded[name])
    assert (got.filename, got.bytes) == (name, len(DOCUMENTS[name][0]))
    assert client.files.content(uploaded[name]).content == DOCUMENTS[name][0]


def test_text_comes_back_with_the_content_type_it_was_sent_with(client):
    """No charset is added to a text type: the server does not know a text file's
    encoding, and a `charset=utf-8` made a Latin-1 file read as mojibake. One the
    client declared is kept."""
    for content_type in ["text/plain", "text/plain; charset=iso-8859-1"]:
        data = "Crème brûlée à Paris".encode("latin-1")
        created = client.files.create(file=("menu.txt", data, content_type), purpose="user_data")
        got = client.files.content(created.id)
        assert got.response.headers["content-type"] == content_type
        assert got.content == data
        client.files.delete(created.id)


def test_the_files_list_takes_openai_page_sizes(client, uploaded, live):
    """Up to 10,000 files a page, and that by default, as OpenAI's files list."""
    everything = client.files.list(limit=10_000)
    assert set(uploaded.values()) <= {f.id for f in everything.data}
    default = httpx.get(
        f"{live.url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    assert len(default["data"]) == len(everything.data)
    too_many = httpx.get(
        f"{live.url}/v1/files",
        params={"limit": 10_001},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "limit"


def test_a_filename_with_quotes_comes_back_as_uploaded(client):
    """The SDK sends `"` in a multipart filename as `%22`; the file keeps its real name."""
    name = 'my "final" notes.txt'
    created = client.files.create(file=(name, b"notes"), purpose="assistants")
    assert created.filename == name
    assert client.files.retrieve(created.id).filename == name
    client.files.delete(created.id)


def test_a_name_outside_ascii_is_kept_from_filename_or_filename_star(client, live):
    """Raw UTF-8 in `filename` (httpx, so the openai SDK) and RFC 5987's `filename*`, which
    .NET's HttpClient sends beside a MIME encoded word in `filename`: the name is the one
    the user gave. A `filename*` that does not decode leaves `filename`."""
    name = "报告 2024 🎉 تقرير.txt"
    assert client.files.create(file=(name, b"data"), purpose="assistants").filename == name

    def upload(disposition: str) -> httpx.Response:
        body = (
            '--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
            f"--BB\r\nContent-Disposition: {disposition}\r\n\r\ndata\r\n--BB--\r\n"
        ).encode()
        headers = {
            "content-type": "multipart/form-data; boundary=BB",
            "authorization": f"Bearer {API_KEY}",
        }
        return httpx.post(f"{live.url}/v1/files", content=body, headers=headers, timeout=20)

    encoded_word = "=?utf-8?B?" + base64.b64encode(name.encode()).decode() + "?="
    dotnet = upload(
        f"form-data; name=file; filename=\"{encoded_word}\"; filename*=utf-8''{quote(name)}"
    )
    assert dotnet.status_code == 200 and dotnet.json()["filename"] == name
    assert client.files.retrieve(dotnet.json()["id"]).filename == name
    undecodable = upload("form-data; name=file; filename=plain.txt; filename*=utf-8''%FF.txt")
    assert undecodable.json()["filename"] == "plain.txt"
    # RFC 5987's charsets are UTF-8 and ISO-8859-1; Python's other codecs are no charset
    # of a name (`undefined` fails with a UnicodeError of its own: it was a 500).
    latin = upload("form-data; name=file; filename=plain.txt; filename*=ISO-8859-1''caf%E9.txt")
    assert latin.json()["filename"] == "caf\u00e9.txt"
    for codec in ("undefined", "unicode_escape", "utf-7"):
        got = upload(f"form-data; name=file; filename=plain.txt; filename*={codec}''%41.txt")
        assert got.status_code == 200 and got.json()["filename"] == "plain.txt", got.text
    # Not of RFC 5987's form (no name after charset'language', no charset): `filename`.
    for malformed in ("utf-8''", "plain-name.txt", "utf-8'plain-name.txt"):
        got = upload(f"form-data; name=file; filename=plain.txt; filename*={malformed}")
        assert got.status_code == 200 and got.json()["filename"] == "plain.txt", got.text


def test_the_store_indexes_supported_files_and_fails_the_rest(client, uploaded, vector_store):
    counts = vector_store.file_counts
    assert (counts.completed, counts.failed, counts.in_progress) == (len(DOCUMENTS), 1, 0)
    assert vector_store.status == "completed" and vector_store.metadata == {"team": "docs"}
    assert vector_store.usage_bytes == sum(len(d) for d, _ in DOCUMENTS.values())
    failed = client.vector_stores.files.retrieve(
        uploaded["photo.png"], vector_store_id=vector_store.id
    )
    assert failed.status == "failed"
    assert failed.last_error.code == "unsupported_file" and ".png" in failed.last_error.message
    done = client.vector_stores.files.list(vector_store.id, filter="completed")
    assert {f.id for f in done.data} == {uploaded[n] for n in DOCUMENTS}


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_search_finds_the_right_document(client, uploaded, vector_store, name):
    page = client.vector_stores.search(vector_store.id, query=DOCUMENTS[name][1])
    assert page.data[0].file_id == uploaded[name]
    assert page.data[0].filename == name
    assert 0 < page.data[0].score <= 1


def test_unknown_ids_are_404(client, vector_store):
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file_missing")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file_missing")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_missing")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.search("vs_missing", query="anything")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve("file_missing", vector_store_id=vector_store.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.create(file_ids=["file_missing"])
    assert caught.value.body["param"] == "file_ids"  # the field the request named it in


def test_an_upload_over_the_limit_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(
            file=("big.txt", b"x" * (UPLOAD_LIMIT_MB * 2**20 + 1)), purpose="assistants"
        )
    assert caught.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.txt", b"a"), purpose="homework")
    assert caught.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as caught:  # past OpenAI's 30 days
        client.files.create(
            file=("a.txt", b"a"),
            purpose="assistants",
            expires_after={"anchor": "created_at", "seconds": 2_592_001},
        )
    assert caught.value.body["param"] == "expires_after.seconds"


def test_vector_store_update_and_list(client, vector_store):
    updated = client.vector_stores.update(vector_store.id, name="renamed")
    assert updated.name == "renamed" and updated.metadata == {"team": "docs"}
    assert vector_store.id in {s.id for s in client.vector_stores.list(limit=100)}


def test_a_vector_store_keeps_the_description_the_sdk_sends(client):
    store = client.vector_stores.create(name="described", description="Team handbook")
    assert client.vector_stores.retrieve(store.id).model_extra["description"] == "Team handbook"
    with pytest.raises(openai.BadRequestError) as caught:
        client.vector_stores.create(description="x" * 513)
    assert caught.value.body["param"] == "description"
    client.vector_stores.delete(store.id)


def test_removing_a_file_removes_its_chunks_and_vectors(client, live, uploaded, vector_store):
    """Last: it changes the shared store."""
    bread, volcano = uploaded["bread.md"], uploaded["volcanoes.txt"]
    assert all(n > 0 for n in _chunk_rows(live, bread))
    assert client.files.delete(bread).deleted
    assert _chunk_rows(live, bread) == (0, 0, 0)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(bread)
    hits = client.vector_stores.search(vector_store.id, query=DOCUMENTS["bread.md"][1]).data
    assert bread not in {h.file_id for h in hits}
    # Taking a file out of a store (the file stays) and deleting the store also drop chunks.
    client.vector_stores.files.delete(volcano, vector_store_id=vector_store.id)
    assert _chunk_rows(live, volcano) == (0, 0, 0)
    assert client.files.retrieve(volcano).id == volcano
    assert all(n > 0 for n in _chunk_rows(live, uploaded["aurora.pdf"]))
    assert client.vector_stores.delete(vector_store.id).deleted
    assert _chunk_rows(live, uploaded["aurora.pdf"]) == (0, 0, 0)


def test_the_rag_example_uploads_indexes_and_finds(live):
    output = run_example("rag_upload.py", "--base-url", f"{live.url}/v1", "--api-key", API_KEY)
    lines = output.splitlines()
    assert lines[0].startswith("indexed: starter.md as file_") and lines[0].endswith("(completed)")
    hits = [line for line in lines if line.startswith("hit: ")]
    assert hits and "starter.md: # Caring for a sourdough starter" in hits[0]


def test_a_stop_during_indexing_unwinds_it_cleanly(tmp_path):
    """SIGTERM while a file is being indexed: the ingestion is cancelled before the store
    closes (it resumes at the next start), and the server exits 0 with no task failing
    after the store has gone."""
    # float32, as the module's server: the default w8a8 calibration would triple the start.
    server = start_server(
        "--api-key", API_KEY, "--compile", "off", "--dtype", "float32", "--data-dir", str(tmp_path)
    )
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        line = "Line {}: glaciers carve valleys over many winters.\n"
        text = "".join(line.format(i) for i in range(20000))
        file = client.files.create(file=("long.txt", text.encode()), purpose="assistants")
        store = client.vector_stores.create(name="long", file_ids=[file.id])
        entry = client.vector_stores.files.retrieve(file.id, vector_store_id=store.id)
        assert entry.status == "in_progress"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        server.log.seek(0)
        log = server.log.read()
    finally:
        server.stop()
    assert "Traceback" not in log, log[-3000:]
