"""Hostile input against one live `python -m engine.serve`: every field of both generation
endpoints drawn from valid and hostile values, malformed and deeply nested bodies, huge
numbers and strings, wrong content types.

The server must answer every request with a status below 500 (streams included: an
error event inside a 200 counts), without dropping a connection, and afterwards still
serve a normal request and report itself healthy. Examples are derandomized so CI sees
the same ones every run; generation is kept to a few tokens so the whole module runs in
well under a minute on two cores.

The server runs a tiny random Llama with the default model's tokenizer and chat template
(tests/conftest.py's tiny_chat_model_dir): what is fuzzed is the server and the engine
loop, which see the same tokens, templates and grammars as with SmolLM2-135M, while a
forward pass costs a fraction of SmolLM2's, which took most of the module's time.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.live_server import LiveServer, start_server
from tests.server.sse_client import events

MODEL = "tiny-chat"
VOCAB = 49152  # the default model's tokenizer
BODY_LIMIT = 65536
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir):
    live = start_server(
        "--model",
        tiny_chat_model_dir,
        "--served-model-name",
        MODEL,
        "--quantization",
        "none",
        "--compile",
        "off",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
        "--max-waiting-requests",
        "32",
        "--max-request-body-bytes",
        str(BODY_LIMIT),
        # A valid fuzzed chat body names no max_tokens mostly: keep its answer short.
        "--max-tokens-default",
        "8",
    )
    yield live
    assert live.stop() == 0


@pytest.fixture(scope="module")
def client(server: LiveServer):
    # Generous: a loaded CI machine is slow, and only a server that stopped answering is a
    # failure. The first requests warm the model and the chat template up.
    with httpx.Client(base_url=server.url, timeout=180) as c:
        warm = c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
        )
        assert warm.status_code == 200
        yield c
    # The server survived it all: it still generates and says it is healthy.
    with httpx.Client(base_url=server.url, timeout=60) as c:
        ok = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert c.get("/health").status_code == 200


# -- values ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**300, 0, -1]),
    st.text(max_size=12),
    st.integers(1000, 40000).map(lambda n: "x" * n),
    st.sampled_from(["\ud800", "a\udfffb", "\U0001f600", "\x00"]),  # lone surrogates, NUL
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A nested value: mostly valid ones, often anything at all."""
    return st.one_of(valid, valid, anything)


def unit(low: float, high: float) -> st.SearchStrategy:
    return st.floats(low, high, allow_nan=False)


texts = st.text(max_size=30)
words = st.text(min_size=1, max_size=10)
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
any_ids = st.lists(st.integers(0, VOCAB + 10), min_size=1, max_size=6)
parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
weather_tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
# Nested structures with hostile values inside them.
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": field(st.just("function")),
            "function": field(
                st.fixed_dictionaries(
                    {"name": field(st.sampled_from(["get_weather", "f", "bad name!", ""]))},
                    optional={
                        "description": field(texts),
                        "parameters": field(st.just(parameters)),
                    },
                )
            ),
        }
    ),
    max_size=3,
)
tool_choice = st.one_of(
    st.sampled_from(["none", "auto", "required", "other"]),
    st.fixed_dictionaries(
        {
            "type": field(st.just("function")),
            "function": field(
                st.fixed_dictionaries({"name": field(st.sampled_from(["get_weather", "f"]))})
            ),
        }
    ),
)
content = st.one_of(
    texts,
    st.lists(
        st.fixed_dictionaries({"type": field(st.just("text")), "text": field(texts)}), max_size=3
    ),
)
message = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
        "content": field(content),
    },
    optional={
        "name": field(texts),
        "tool_call_id": field(texts),
        "tool_calls": field(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": field(texts),
                        "type": st.just("function"),
                        "function": field(
                            st.fixed_dictionaries({"name": field(texts), "arguments": field(texts)})
                        ),
                    }
                ),
                max_size=2,
            )
        ),
    },
)
NESTED = {
    "messages": st.lists(message, max_size=4),
    "tools": tools,
    "tool_choice": tool_choice,
    "stop": st.one_of(st.lists(texts, max_size=20), st.integers(250, 300).map(lambda n: "s" * n)),
    "stop_token_ids": any_ids,
    "allowed_token_ids": st.one_of(any_ids, st.just([])),
    "bad_words": st.one_of(st.lists(texts, max_size=300), st.lists(anything, max_size=3)),
    "prompt": st.lists(any_ids | texts | anything, max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": anything}),
    # keys a template uses or the server sets, with hostile values
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(
            [
                "messages",
                "self",
                "tools",
                "add_generation_prompt",
                "continue_final_message",
                "bos_token",
                "raise_exception",
                "",
            ]
        )
        | texts,
        anything,
        max_size=3,
    ),
    "structured_outputs": st.dictionaries(
        st.sampled_from(
            [
                "json",
                "regex",
                "choice",
                "grammar",
                "json_object",
                "structural_tag",
                "disable_fallback",
            ]
        ),
        anything | st.sampled_from(["((", "a{99999}", "root ::= (", '{"$ref": "#"}']),
        max_size=3,
    ),
}
STRUCTURES = [
    {"regex": "[a-z]+"},
    {"choice": ["yes", "no"]},
    {"json_object": True},
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    {"grammar": 'start: "a" | "b"'},
]

# Each top-level field's valid values (a body of only these is a valid request); the
# bodies then set one or two fields to something hostile.
SAMPLING = {
    "n": st.integers(1, 3),
    "temperature": unit(0, 2),
    "top_p": unit(0.01, 1),
    "top_k": st.integers(-1, 100),
    "min_p": unit(0, 1),
    "seed": st.integers(-(2**63), 2**64 - 3),
    "stop": st.one_of(words, st.lists(words, max_size=4)),
    "presence_penalty": unit(-2, 2),
    "frequency_penalty": unit(-2, 2),
    "repetition_penalty": unit(0.5, 2),
    "min_tokens": st.integers(0, 1),
    "ignore_eos": st.booleans(),
    "stop_token_ids": valid_ids,
    "allowed_token_ids": valid_ids,
    "bad_words": st.lists(words, max_size=4),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "model": st.just(MODEL),
    "user": texts,
    "response_format": st.just({"type": "text"}),
    "logit_bias": st.just({}),
    "structured_outputs": st.sampled_from(STRUCTURES),
    "truncate_prompt_tokens": st.one_of(st.integers(1, 600), st.just(-1)),
    "prompt_logprobs": st.integers(0, 20),  # above 0 with stream: a 400, as in vLLM
    "return_token_ids": st.booleans(),
    "return_tokens_as_token_ids": st.booleans(),
}
CHAT = {
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}
        ),
        min_size=1,
        max_size=3,
    ),
    "max_tokens": st.integers(1, 3),
    "max_completion_tokens": st.integers(1, 3),
    "logprobs": st.booleans(),
    "tools": st.lists(st.just(weather_tool), max_size=1),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "parallel_tool_calls": st.booleans(),
    "chat_template_kwargs": st.dictionaries(texts, scalars, max_size=3),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    **SAMPLING,
}
COMPLETIONS = {
    "prompt": st.one_of(words, valid_ids, st.lists(words | valid_ids, min_size=1, max_size=3)),
    "max_tokens": st.integers(1, 3),
    "logprobs": st.integers(0, 20),
    **SAMPLING,
}
# Fields valid only together with others, and unknown ones: only ever set to hostile values.
EXTRA = (
    "top_logprobs",
    "stream_options",
    "echo",
    "suffix",
    "best_of",
    "functions",
    "use_beam_search",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    # vLLM's fields refused unless at their default, or only type-checked
    "priority",
    "watermarking",
    "truncation_side",
    "logprob_token_ids",
    "return_prompt_text",
    "kv_transfer_params",
    "vllm_xargs",
    "logits_processors",
    "repetition_detection",
    "stream_interval",
    "thinking_token_budget",
    "chat_template",
    "add_special_tokens",
    "include_reasoning",
    "prompt_embeds",
    "documents",
    "length_penalty",
    "session_id",
    "mm_processor_kwargs",
    "cache_salt",
    "request_id",
)


def hostile_value(name: str) -> st.SearchStrategy:
    return st.one_of(anything, NESTED[name]) if name in NESTED else anything


def bodies(valid: dict[str, st.SearchStrategy], required: str) -> st.SearchStrategy[dict]:
    """A valid body, or one with one or two fields set to a hostile value: a single bad
    value on an otherwise valid request is what reaches deepest into the server."""
    base = st.fixed_dictionaries(
        {required: valid[required]}, optional={k: v for k, v in valid.items() if k != required}
    )
    names = st.sampled_from(sorted({*valid, *EXTRA}))
    hostile = st.lists(
        names.flatmap(lambda n: st.tuples(st.just(n), hostile_value(n))), min_size=1, max_size=2
    ).map(dict)
    overlaid = st.tuples(base, hostile).map(lambda pair: {**pair[0], **pair[1]})
    return st.one_of(base, overlaid, overlaid, overlaid).map(_bounded)


def _bounded(body: dict) -> dict:
    """Keep generation short (what a long answer would show is not robustness): a body
    that could be valid asks for at most 3 tokens, an unset limit included."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if type(value) is int and 3 < value < 512:
            body[name] = 3
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2
    return body


# -- checking one exchange -------------------------------------------------------------------


def _constraints_conflict(error: dict) -> bool:
    """The documented end of a stream whose constraints (allowed_token_ids, bad_words, a
    tool call's or structured output's grammar) leave no token at some step after the
    first: a client's contradiction, found only once generation has got there."""
    return error["type"] == "invalid_request_error" and error["message"].startswith(
        "no token was left to sample"
    )


def check(
    client: httpx.Client, path: str, content: bytes, content_type: str | None = "application/json"
) -> int:
    """Send one request; it must get a well-formed answer below 500."""
    headers = {"content-type": content_type} if content_type else {}
    try:
        with client.stream("POST", path, content=content, headers=headers) as response:
            if response.status_code == 200 and response.headers["content-type"].startswith(
                "text/event-stream"
            ):
                received = list(events(response))
                errors = [e for e in received if isinstance(e, dict) and "error" in e]
                errors = [e for e in errors if not _constraints_conflict(e["error"])]
                assert not errors, f"error event in a stream: {errors} for {content[:300]!r}"
                assert received[-1] == "[DONE]"
            else:
                response.read()
    except httpx.TransportError as exc:
        raise AssertionError(f"connection dropped ({exc!r}) for {content[:300]!r}") from None
    status = response.status_code
    assert status < 500, f"{status} {response.text[:300]} for {content[:300]!r}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return status


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity included, as Python writes them


# -- the fuzzing -----------------------------------------------------------------------------


@FUZZ
@given(body=bodies(CHAT, "messages"))
def test_fuzz_chat_fields(client, body):
    check(client, "/v1/chat/completions", dumps(body))


@FUZZ
@given(body=bodies(COMPLETIONS, "prompt"))
def test_fuzz_completions_fields(client, body):
    check(client, "/v1/completions", dumps(body))


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 3000).map(lambda d: b'{"prompt": ' + b"[" * d + b"1" + b"]" * d + b"}"),
    st.integers(4200, 6000).map(lambda d: b'{"prompt": "hi", "max_tokens": 1' + b"0" * d + b"}"),
    st.integers(1, 5).map(lambda d: b'{"prompt": "hi", "n": 1e' + b"9" * d + b"}"),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"{}",
            b'"x"',
            b'{"prompt": "hi"',
            b"\xff\xfe",
            b'{"prompt": NaN}',
            b'{"messages": Infinity}',
        ]
    ),
    st.integers(BODY_LIMIT - 100, BODY_LIMIT + 100).map(
        lambda n: b'{"prompt": "' + b"a" * n + b'", "max_tokens": 1}'
    ),
)


@settings(FUZZ, max_examples=40)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=raw_bodies)
def test_fuzz_malformed_bodies(client, path, body):
    check(client, path, body)


@settings(FUZZ, max_examples=25)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "application/jsonx",
                "application/json; charset=utf-8",
                "APPLICATION/JSON",
            ]
        ),
        # (what HTTP allows in a header value: no surrounding blanks)
        st.text(max_size=20).filter(
            lambda t: t.isascii() and t.isprintable() and t == t.strip() and t != ""
        ),
    ),
)
def test_fuzz_content_types(client, path, content_type):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    status = check(client, path, dumps(body), content_type)
    is_json = (content_type or "").split(";")[0].strip().lower() == "application/json"
    assert status == (200 if is_json else 415)


# -- the review's engine-thread findings, with streams in flight --------------------------------


def test_requests_that_once_broke_the_engine_leave_other_streams_alone(server, client):
    """Each of these used to fail inside the engine thread, killing it or failing every
    request in flight; now each is a 400 and the streams around them finish normally."""

    def stream(i: int) -> list:
        body = {"prompt": f"Count to {i}:", "max_tokens": 24, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=server.url, timeout=120) as c,
            c.stream("POST", "/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200
            return list(events(response))

    hostile = [
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": 1, "skip_special_tokens": 0},
            "skip_special_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "min_tokens": 1,
                "stop_token_ids": [VOCAB],
            },
            "stop_token_ids",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 2, "seed": 2**64 - 1}, "seed"),
        ("/v1/completions", {"prompt": ["hi"] * 1000, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 128}, "n"),
        # token 0 is the tokenizer's "<|endoftext|>": allowed alone and banned, nothing is left
        (
            "/v1/completions",
            {"prompt": "hi", "allowed_token_ids": [0], "bad_words": ["<|endoftext|>"]},
            None,
        ),
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream, i) for i in range(4)]
        for path, body, param in hostile:
            r = client.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        results = [s.result() for s in streams]
    for received in results:
        assert received[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in received)
        assert received[-2]["choices"][0]["finish_reason"] == "length"
    assert client.get("/health").status_code == 200
