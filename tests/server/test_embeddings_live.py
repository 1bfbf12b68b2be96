"""`POST /v1/embeddings` through the openai SDK against `python -m engine.serve`."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from tests.server.live_server import API_KEY, start_server

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def live():
    server = start_server("--api-key", API_KEY, "--compile", "off", "--dtype", "float32")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def test_float_and_base64_agree(client):
    texts = ["The cat sat on the mat.", "A kitten sleeps on the rug.", "Bond yields rose."]
    as_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    assert as_float.model == MODEL and as_float.object == "list"
    assert [d.index for d in as_float.data] == [0, 1, 2]
    a = np.array([d.embedding for d in as_float.data])
    b = np.array([d.embedding for d in as_base64.data])
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a[0] @ a[1] > a[0] @ a[2]
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 10


def test_token_arrays_match_text(client, live):
    text = "Retrieval augmented generation"
    by_text = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    ids = list(range(2000, 2000 + by_text.usage.prompt_tokens))  # any valid ids
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids[:2]], encoding_format="float")
    assert by_ids.usage.prompt_tokens == len(ids) + 2
    assert len(by_ids.data) == 2
    raw = httpx.post(
        f"{live.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "input": ids},
    ).json()
    np.testing.assert_allclose(raw["data"][0]["embedding"], by_ids.data[0].embedding, atol=1e-6)


def test_one_long_token_array_is_one_input(client, live):
    """A flat array of token ids is one input, even past the 2,048-inputs limit; optional
    fields sent as null mean what their omission means."""
    ids = [2000 + i % 500 for i in range(3000)]
    flat = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    nested = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    assert len(flat.data) == 1 and flat.usage.prompt_tokens == nested.usage.prompt_tokens
    np.testing.assert_allclose(flat.data[0].embedding, nested.data[0].embedding, atol=1e-6)
    raw = httpx.post(
        f"{live.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "input": "hi", "encoding_format": None, "user": None},
    )
    assert raw.status_code == 200 and isinstance(raw.json()["data"][0]["embedding"], list)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [[1, 2], []]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": [[1]] * 2049}, "input"),
        ({"input": "a", "user": 7}, "user"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "encoding_format": ""}, "encoding_format"),
        ({"input": "a", "encoding_format": 0}, "encoding_format"),
        ({"input": "a", "dimensions": 384.0}, "dimensions"),
        ({"input": "a", "dimensions": 64}, "dimensions"),
    ],
)
def test_bad_input_is_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, **body)
    assert caught.value.body["param"] == param


def test_the_embedding_model_is_listed_apart_from_the_chat_model(client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards[MODEL].task == "embed" and cards["smollm2-135m-instruct"].task == "generate"
    assert client.models.retrieve(MODEL).max_model_len == 256
    with pytest.raises(openai.NotFoundError):  # chat is the chat model's
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert caught.value.body["param"] == "model"
