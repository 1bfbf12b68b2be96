"""`POST /v1/embeddings` through the openai SDK against `python -m engine.serve`."""

from __future__ import annotations

import base64

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


def _vector(client, text_or_ids, **vllm) -> tuple[np.ndarray, int]:
    """One input's embedding (as floats) and its usage, with vLLM's fields."""
    found = client.embeddings.create(
        model=MODEL, input=text_or_ids, encoding_format="float", extra_body=vllm
    )
    return np.array(found.data[0].embedding), found.usage.prompt_tokens


def test_vllm_fields_are_honoured(client):
    """truncate_prompt_tokens keeps each input's last tokens (-1: one window's worth),
    add_special_tokens=False leaves out [CLS]/[SEP], normalize=False (or use_activation)
    gives the raw mean, and endianness orders base64's bytes, as in vLLM."""
    ids = list(range(2000, 2300))
    for keep, kept in ((5, ids[-5:]), (-1, ids[-254:])):
        vector, tokens = _vector(client, ids, truncate_prompt_tokens=keep)
        assert tokens == len(kept)
        np.testing.assert_allclose(vector, _vector(client, kept)[0], atol=1e-6)
    vector, tokens = _vector(client, "the cat sat on the mat", truncate_prompt_tokens=2)
    assert tokens == 2
    np.testing.assert_allclose(vector, _vector(client, "the mat")[0], atol=1e-6)
    without, tokens = _vector(client, ids, truncate_prompt_tokens=-1, add_special_tokens=False)
    assert tokens == 256
    np.testing.assert_allclose(without, _vector(client, ids[-256:], add_special_tokens=False)[0])

    unit = _vector(client, "the cat sat on the mat")[0]
    framed = [101, *ids[:10], 102]  # [CLS] ... [SEP], written by the client
    np.testing.assert_allclose(
        _vector(client, framed, add_special_tokens=False)[0],
        _vector(client, ids[:10])[0],
        atol=1e-6,
    )
    for field in ("normalize", "use_activation"):
        raw = _vector(client, "the cat sat on the mat", **{field: False})[0]
        assert abs(np.linalg.norm(raw) - 1) > 0.1
        np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)
    little = client.embeddings.create(model=MODEL, input="cat", encoding_format="float")
    raw_big = client.with_raw_response.embeddings.create(
        model=MODEL, input="cat", encoding_format="base64", extra_body={"endianness": "big"}
    ).http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw_big), dtype=">f4")
    np.testing.assert_allclose(decoded, little.data[0].embedding, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
        ({"add_special_tokens": "no"}, "add_special_tokens"),
        ({"normalize": 1}, "normalize"),
        ({"normalize": True, "use_activation": False}, "use_activation"),
        ({"embed_dtype": "float16"}, "embed_dtype"),
        ({"endianness": "middle"}, "endianness"),
        ({"priority": 1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"request_id": 7}, "request_id"),
        ({"request_id": "x" * 257}, "request_id"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": 5}, "cache_salt"),
        ({"mm_processor_kwargs": "x"}, "mm_processor_kwargs"),
        ({"additional_data": {"k": 1}}, "additional_data"),
        ({"padding": "max_length"}, "padding"),
        ({"truncation_side": "right"}, "truncation_side"),
    ],
)
def test_vllm_fields_this_server_cannot_honour_are_400(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input="a", extra_body=fields)
    assert caught.value.body["param"] == param


def test_vllm_fields_that_change_nothing_here_are_accepted(client):
    """cache_salt (embeddings share no prefix cache), mm_processor_kwargs (the inputs are
    text), and the unsupported fields at their defaults embed as without them."""
    plain = _vector(client, "the cat sat on the mat")
    same = _vector(
        client,
        "the cat sat on the mat",
        cache_salt="s" * 1024,
        mm_processor_kwargs={"size": 1},
        padding="do_not_pad",
        truncation_side="left",
        priority=0,
        additional_data=None,
    )
    np.testing.assert_allclose(same[0], plain[0])
    assert same[1] == plain[1]


def test_chat_embeddings_are_400_naming_messages(client):
    """vLLM's chat-style embedding request (`messages`, no `input`) is refused as such."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(
            model=MODEL,
            input=openai.NOT_GIVEN,
            extra_body={"messages": [{"role": "user", "content": "hi"}]},
        )
    assert caught.value.body["param"] == "messages"
    assert "chat embeddings" in caught.value.body["message"]


def test_a_text_of_no_tokens_without_special_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(
            model=MODEL, input=["a", " "], extra_body={"add_special_tokens": False}
        )
    assert caught.value.body["param"] == "input" and "input[1]" in caught.value.body["message"]


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
