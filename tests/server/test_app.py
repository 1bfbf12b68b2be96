"""The HTTP API on a fake engine: response shapes, streaming, errors, limits, metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from engine.errors import EngineShutdownError
from orchestrator.accounts.identity import cache_salt
from tests.conftest import record_event_loop_calls
from tests.server.fake_engine import FakeEngine
from tests.server.fake_tokenizer import CHATML, CHATML_WITH_TOOLS, FakeTokenizer
from tests.server.sse_client import events, stream

USER = [{"role": "user", "content": "Say hello"}]
PROMPT = "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"


def chat(server, **body):
    return server.client.post("/v1/chat/completions", json={"messages": USER, **body})


def test_chat_completion_shape_and_usage(serve):
    server = serve()
    r = chat(server, model="fake-model", max_tokens=50)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and body["model"] == "fake-model"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world!", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": 13,
        "total_tokens": len(PROMPT) + 13,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert server.engine.tokenizer.last_prompt == PROMPT


def test_chat_stream_follows_openai_chunk_shape(serve):
    server = serve()
    chunks = stream(
        server.client,
        "/v1/chat/completions",
        {"messages": USER, "stream_options": {"include_usage": True}},
    )
    assert chunks[-1] == "[DONE]"
    data = chunks[:-1]
    assert len({(c["id"], c["created"]) for c in data}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in data)
    *choice_chunks, usage_chunk = data
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 13
    assert all(c["usage"] is None for c in choice_chunks)
    deltas = [c["choices"][0]["delta"] for c in choice_chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    reasons = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] == "stop"
    assert deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == "Hello, world!"
    assert len(deltas) == 1 + 13 + 1  # role, one chunk per token, finish


def test_stream_without_usage_has_no_usage_chunk(serve):
    chunks = stream(serve().client, "/v1/chat/completions", {"messages": USER})
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_vllm_continuous_usage_stats_give_every_chunk_the_usage_so_far(serve):
    """vLLM's stream_options.continuous_usage_stats, with include_usage: each chunk's usage
    counts the tokens generated up to it; the last chunk is the usage chunk as ever.
    Without include_usage it adds nothing, as in vLLM."""
    server = serve()
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 4}),
    ):
        *chunks, last, done = stream(server.client, path, {**body, "stream_options": options})
        assert done == "[DONE]"
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[0] <= 1
        assert counts[-1] == last["usage"]["completion_tokens"] > 1 and last["choices"] == []
        prompt_tokens = last["usage"]["prompt_tokens"]
        assert all(
            c["usage"]["total_tokens"] == prompt_tokens + c["usage"]["completion_tokens"]
            for c in chunks
        )
        options_alone = {"continuous_usage_stats": True}
        chunks = stream(server.client, path, {**body, "stream_options": options_alone})
        assert all("usage" not in c for c in chunks[:-1])
    bad = {"messages": USER, "stream": True, "stream_options": {"continuous_usage_stats": 1}}
    r = server.client.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stream_options.continuous_usage_stats"


def test_max_tokens_stop_n_and_seed_reach_the_engine(serve):
    server = serve()
    body = chat(
        server, max_completion_tokens=4, n=2, seed=7, temperature=0.5, stop=[","], top_k=3
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert {c["message"]["content"] for c in body["choices"]} == {"Hell"}
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    params = server.engine.params[-1]
    assert (params.max_tokens, params.n, params.seed, params.stop, params.top_k) == (
        4,
        2,
        7,
        [","],
        3,
    )
    assert chat(server, stop=",").json()["choices"][0]["message"]["content"] == "Hello"


def test_max_tokens_default_caps_only_requests_that_name_none(serve):
    server = serve(FakeEngine(max_model_len=len(PROMPT) + 6), max_tokens_default=4)
    unnamed = chat(server).json()["choices"][0]
    assert (unnamed["message"]["content"], unnamed["finish_reason"]) == ("Hell", "length")
    assert server.engine.params[-1].max_tokens == 4
    assert chat(server, max_tokens=5).json()["choices"][0]["message"]["content"] == "Hello"
    # A prompt 3 tokens longer leaves 3 in the window, less than the cap: the window rules.
    chat(server, messages=[{"role": "user", "content": "Say hello!!!"}])
    assert server.engine.params[-1].max_tokens == 3
    uncapped = serve()
    chat(uncapped)
    assert uncapped.engine.params[-1].max_tokens is None


def test_streaming_n2_sends_role_once_per_choice(serve):
    chunks = stream(serve().client, "/v1/chat/completions", {"messages": USER, "n": 2})
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert [("role" in c["delta"]) for c in choices].count(True) == 1
        assert "".join(c["delta"].get("content", "") for c in choices) == "Hello, world!"
        assert choices[-1]["finish_reason"] == "stop"


def test_chat_logprobs(serve):
    body = chat(serve(), logprobs=True, top_logprobs=2, max_tokens=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["H", "e", "l"]
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [72]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["H", "?"]
    assert (
        chat(serve(), logprobs=True, max_tokens=1).json()["choices"][0]["logprobs"]["content"][0][
            "top_logprobs"
        ]
        == []
    )


def test_completions_text_ids_batch_echo_and_logprobs(serve):
    server = serve()
    post = server.client.post
    single = post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5}).json()
    assert single["object"] == "text_completion" and single["id"].startswith("cmpl-")
    assert single["choices"][0]["text"] == "Hello"
    assert single["choices"][0]["finish_reason"] == "length"
    assert single["usage"]["prompt_tokens"] == 2
    ids = post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 2}).json()
    assert ids["choices"][0]["text"] == "He"
    # n sent as null is n left out: best_of 1 equals it
    nulls = post("/v1/completions", json={"prompt": "Hi", "n": None, "best_of": 1, "max_tokens": 1})
    assert nulls.status_code == 200 and len(nulls.json()["choices"]) == 1
    batch = post(
        "/v1/completions", json={"prompt": ["a", "bc"], "n": 2, "max_tokens": 2, "echo": True}
    ).json()
    assert [(c["index"], c["text"]) for c in batch["choices"]] == [
        (0, "aHe"),
        (1, "aHe"),
        (2, "bcHe"),
        (3, "bcHe"),
    ]
    assert batch["usage"]["prompt_tokens"] == 3
    assert batch["usage"]["completion_tokens"] == 8
    lp = post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1}).json()
    logprobs = lp["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["H", "e", "l"]
    assert logprobs["token_logprobs"] == [-0.25] * 3
    assert logprobs["top_logprobs"] == [{"H": -0.25}, {"e": -0.25}, {"l": -0.25}]
    assert logprobs["text_offset"] == [0, 1, 2]


def test_completions_stream(serve):
    chunks = stream(
        serve().client,
        "/v1/completions",
        {
            "prompt": ["a", "b"],
            "max_tokens": 4,
            "logprobs": 0,
            "stream_options": {"include_usage": True},
        },
    )
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    assert chunks[-2]["usage"]["completion_tokens"] == 8
    texts: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    for c in chunks[:-2]:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        offsets.setdefault(choice["index"], []).extend(choice["logprobs"]["text_offset"])
    assert texts == {0: "Hell", 1: "Hell"}
    assert offsets[0] == [0, 1, 2, 3]


def test_models_health_and_metrics(serve):
    server = serve(served_model_names=["fake-model", "alias"])
    models = server.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-model", "alias"]
    assert models["data"][0]["max_model_len"] == 2048
    assert server.client.get("/v1/models/alias").json()["id"] == "alias"
    assert server.client.get("/health").json() == {"status": "ok", "compile": "off", "cpu": {}}
    assert chat(server, model="alias").json()["model"] == "alias"
    text = server.client.get("/metrics").text
    assert "tokenmill:time_to_first_token_seconds_count 1.0" in text
    assert "tokenmill:e2e_request_latency_seconds_count 1.0" in text
    assert "tokenmill:inter_token_latency_seconds_count 12.0" in text
    assert f"tokenmill:prompt_tokens_total {float(len(PROMPT))}" in text
    assert "tokenmill:generation_tokens_total 13.0" in text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "num_preemptions_total",
    ):
        assert f"tokenmill:{name} " in text


def test_metrics_count_finished_sequences_by_reason(serve):
    """vLLM's request_success counter by finished_reason, each of n counted, the reasons
    no sequence ended with at zero."""
    server = serve()
    chat(server, n=2)
    chat(server, max_tokens=3)
    text = server.client.get("/metrics").text
    assert 'tokenmill:request_success_total{finished_reason="stop"} 2.0' in text
    assert 'tokenmill:request_success_total{finished_reason="length"} 1.0' in text
    assert 'tokenmill:request_success_total{finished_reason="abort"} 0.0' in text


def test_cached_tokens_reported_from_the_engine(serve):
    server = serve()
    system = [{"role": "system", "content": "You are terse. " * 20}]
    first = chat(server, messages=system + USER).json()
    second = chat(server, messages=system + USER).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 280


def test_vllm_cache_salt_narrows_the_owners_namespace(serve):
    """A request's cache_salt is combined with its owner's: requests share cached blocks
    only with the same owner and salt, and no salt reaches another owner's namespace."""
    server = serve()
    assert chat(server).status_code == 200
    assert server.engine.params[-1].cache_salt is None  # the local user's: none
    assert chat(server, cache_salt="abc").status_code == 200
    salted = server.engine.params[-1].cache_salt
    body = {"prompt": "Hi", "max_tokens": 1, "cache_salt": "abc"}
    assert server.client.post("/v1/completions", json=body).status_code == 200
    assert server.engine.params[-1].cache_salt == salted
    assert chat(server, cache_salt="abd").status_code == 200
    assert len({None, salted, server.engine.params[-1].cache_salt}) == 3
    owners = {cache_salt(o, s) for o in ("user_a", "user_b") for s in (None, "x", salted)}
    assert len(owners) == 6 and salted not in owners
    for bad in ("", "x" * 1025, 1):
        assert_error(chat(server, cache_salt=bad), 400, "cache_salt")


def test_vllm_request_id_names_the_response(serve):
    """As in vLLM, the response's id is the prefix and the request_id, on every chunk;
    two requests may share one (the engine's own ids stay unique)."""
    server = serve()
    assert chat(server, request_id="trace-1").json()["id"] == "chatcmpl-trace-1"
    chunks = stream(server.client, "/v1/chat/completions", {"messages": USER, "request_id": "t"})
    assert {c["id"] for c in chunks if c != "[DONE]"} == {"chatcmpl-t"}
    body = {"prompt": ["a", "b"], "max_tokens": 1, "request_id": "trace-1"}
    assert server.client.post("/v1/completions", json=body).json()["id"] == "cmpl-trace-1"
    assert len(server.engine.num_seqs) == 4
    assert chat(server).json()["id"].startswith("chatcmpl-")
    for bad in ("", "x" * 257, 7):
        assert_error(chat(server, request_id=bad), 400, "request_id")
    # vLLM's X-Request-Id header names it too, and wins over the body's request_id
    headers = {"X-Request-Id": "from-header"}
    response = server.client.post(
        "/v1/chat/completions", json={"messages": USER, "request_id": "b"}, headers=headers
    )
    assert response.json()["id"] == "chatcmpl-from-header"
    response = server.client.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers=headers
    )
    assert response.json()["id"] == "cmpl-from-header"
    response = server.client.post(
        "/v1/completions", json={"prompt": "a"}, headers={"X-Request-Id": "x" * 257}
    )
    assert_error(response, 400, "X-Request-Id")


def test_every_response_names_its_request_id(serve):
    """As OpenAI's API: each response, errors and streams included, carries `x-request-id`
    (the SDK's `_request_id`); a client's own X-Request-Id comes back as sent."""
    server = serve(api_keys=["k1"])
    key = {"Authorization": "Bearer k1"}
    responses = [
        server.client.get("/v1/models", headers=key),
        server.client.get("/v1/models"),  # 401
        server.client.get("/v1/nowhere", headers=key),  # 404
        server.client.post("/v1/chat/completions", json={"messages": "x"}, headers=key),  # 400
        server.client.get("/health"),
    ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert [r.status_code for r in responses] == [200, 401, 404, 400, 200]
    assert all(i.startswith("req_") and len(i) == 36 for i in ids) and len(set(ids)) == 5
    with server.client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "stream": True}, headers=key
    ) as r:
        assert r.headers["x-request-id"].startswith("req_")
    mine = {**key, "X-Request-Id": "trace-7"}
    assert server.client.get("/v1/models", headers=mine).headers["x-request-id"] == "trace-7"
    for unfit in ("has space", "x" * 257):
        r = server.client.get("/v1/models", headers={**key, "X-Request-Id": unfit})
        assert r.headers["x-request-id"].startswith("req_")


def test_a_server_failure_names_the_request_in_its_message(serve):
    server = serve(FakeEngine(failure=RuntimeError("a bug")))
    r = server.client.post("/v1/chat/completions", json={"messages": USER})
    error = assert_error(r, 500, code="server_error")
    assert r.headers["x-request-id"] in error["message"]
    assert "a bug" not in r.text


# -- errors ----------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_client_mistakes_get_openai_shaped_4xx(serve):
    server = serve(max_body_bytes=3000)
    post = server.client.post
    r = post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, code="invalid_json")
    assert_error(chat(server, temperature="hot"), 400, "temperature")
    assert_error(chat(server, temperature=-1), 400, "temperature")
    assert_error(chat(server, top_p=0), 400, "top_p")
    assert_error(chat(server, presence_penalty=3), 400, "presence_penalty")
    assert_error(chat(server, stop=[""]), 400, "stop")
    assert_error(chat(server, model="gpt-9"), 404, "model", "model_not_found")
    assert_error(server.client.get("/v1/models/gpt-9"), 404, "model")
    assert_error(
        post("/v1/chat/completions", json={"messages": USER, "pad": "x" * 4000}),
        413,
        code="request_too_large",
    )
    error = assert_error(chat(server, max_tokens=2040), 400, "messages", "context_length_exceeded")
    assert "maximum context length is 2048" in error["message"]
    assert_error(
        post("/v1/completions", json={"prompt": "x" * 2040, "max_tokens": 20}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert_error(post("/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_error(post("/v1/chat/completions", json=[1, 2]), 400)
    assert_error(server.client.get("/v1/nothing"), 404)
    assert_error(server.client.get("/v1/chat/completions"), 405)
    # tool messages answer the calls of the assistant message before them, by id
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    asked = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    for messages in (
        [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
        [*asked, {"role": "tool", "tool_call_id": "call_2", "content": "18C"}],
        [*asked, *USER, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
    ):
        assert_error(chat(server, messages=messages), 400, "messages")
    assert server.engine.params == []  # none of these reached the engine


GUIDED_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_vllm_structure_fields_constrain_the_output_on_both_routes(serve):
    """vLLM's structured_outputs and its older guided_* fields are the engine's structured
    outputs, as response_format is; a json schema as a string is the schema's JSON text."""
    server = serve()
    cases = [
        ("guided_json", GUIDED_SCHEMA, "json", GUIDED_SCHEMA),
        ("guided_json", json.dumps(GUIDED_SCHEMA), "json", GUIDED_SCHEMA),
        ("guided_regex", "[0-9]+", "regex", "[0-9]+"),
        ("guided_choice", ["yes", "no"], "choice", ["yes", "no"]),
        ("guided_grammar", 'start: "yes" | "no"', "grammar", 'start: "yes" | "no"'),
        ("structured_outputs", {"json": GUIDED_SCHEMA}, "json", GUIDED_SCHEMA),
        ("structured_outputs", {"json": json.dumps(GUIDED_SCHEMA)}, "json", GUIDED_SCHEMA),
        ("structured_outputs", {"regex": "[0-9]+", "grammar": None}, "regex", "[0-9]+"),
        ("structured_outputs", {"choice": ["yes", "no"]}, "choice", ["yes", "no"]),
        ("structured_outputs", {"grammar": 'start: "a"'}, "grammar", 'start: "a"'),
        (
            "structured_outputs",
            {"json_object": True, "disable_fallback": True},
            "json_object",
            True,
        ),
    ]
    for field, value, kind, expected in cases:
        for response in (
            chat(server, **{field: value}),
            server.client.post("/v1/completions", json={"prompt": "Hi", field: value}),
        ):
            assert response.status_code == 200, response.text
            structure = server.engine.params[-1].structured_outputs
            assert structure.kind == kind and getattr(structure, kind) == expected


def test_vllm_chat_template_options_reach_the_rendering(serve):
    """vLLM's chat_template_kwargs are template variables; add_generation_prompt false
    opens no assistant turn; continue_final_message goes on with the last assistant
    message, without its end of turn."""
    no_think = "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    server = serve(FakeEngine(tokenizer=FakeTokenizer(CHATML + no_think)))
    tokenizer = server.engine.tokenizer
    assert chat(server, chat_template_kwargs={"enable_thinking": False}).status_code == 200
    assert tokenizer.last_prompt == PROMPT + "<no-think>"
    assert chat(server, chat_template_kwargs={"other": 1}).status_code == 200
    assert tokenizer.last_prompt == PROMPT
    assert chat(server, add_generation_prompt=False).status_code == 200
    assert tokenizer.last_prompt == "<|im_start|>user\nSay hello<|im_end|>\n"
    started = [*USER, {"role": "assistant", "content": "Hello, "}]
    body = chat(
        server, messages=started, add_generation_prompt=False, continue_final_message=True
    ).json()
    assert body["usage"]["prompt_tokens"] == len(PROMPT + "Hello, ")
    assert server.engine.prompts[-1] == [ord(c) for c in PROMPT + "Hello, "]


def test_vllm_chat_template_options_are_checked(serve):
    server = serve()
    started = [*USER, {"role": "assistant", "content": "Hello, "}]
    for body, param in (
        ({"messages": started, "continue_final_message": True}, "continue_final_message"),
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),
        ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"self": 1}}, "chat_template_kwargs"),
        (
            {
                "messages": [*USER, {"role": "assistant", "content": " "}],
                "continue_final_message": True,
                "add_generation_prompt": False,
            },
            "continue_final_message",
        ),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        # the template variables override the options, and are checked as the options are
        (
            {
                "messages": started,
                "add_generation_prompt": False,
                "continue_final_message": True,
                "chat_template_kwargs": {"add_generation_prompt": True},
            },
            "chat_template_kwargs",
        ),
        (
            {"messages": started, "chat_template_kwargs": {"continue_final_message": True}},
            "chat_template_kwargs",
        ),
        (
            {
                "add_generation_prompt": False,
                "chat_template_kwargs": {"continue_final_message": True},
            },
            "chat_template_kwargs",
        ),
        ({"chat_template_kwargs": {"add_generation_prompt": "no"}}, "chat_template_kwargs"),
    ):
        assert_error(chat(server, **body), 400, param)
    # the message names the option as the client sent it
    both = chat(server, messages=started, chat_template_kwargs={"continue_final_message": True})
    assert assert_error(both, 400, "chat_template_kwargs")["message"].startswith(
        "chat_template_kwargs.continue_final_message and add_generation_prompt cannot"
    )
    assert server.engine.params == []


def test_vllm_truncate_prompt_tokens_keeps_the_prompts_last_tokens(serve):
    """On both routes, before the window is checked: a prompt longer than the window runs
    on its last tokens; -1 keeps the window's worth; 0 or below -1 is a 400."""
    server = serve(FakeEngine(max_model_len=len(PROMPT) + 20))

    def completion(**body):
        return server.client.post("/v1/completions", json={"max_tokens": 2, **body})

    long_text = "x" * 100 + "tail"
    body = completion(prompt=long_text, truncate_prompt_tokens=4, echo=True).json()
    assert server.engine.prompts[-1] == [ord(c) for c in "tail"]
    assert body["usage"]["prompt_tokens"] == 4
    assert body["choices"][0]["text"].startswith("tail")
    window = completion(prompt=[7] * 100, truncate_prompt_tokens=-1, echo=True, max_tokens=0)
    assert window.status_code == 200, window.text
    assert server.engine.prompts[-1] == [7] * (len(PROMPT) + 20)
    # The window's worth leaves no room for a completion, as in vLLM.
    full = completion(prompt=[7] * 100, truncate_prompt_tokens=-1)
    assert_error(full, 400, "prompt", "context_length_exceeded")
    assert completion(prompt="short", truncate_prompt_tokens=50).status_code == 200
    assert server.engine.prompts[-1] == [ord(c) for c in "short"]
    assert chat(server, truncate_prompt_tokens=7).status_code == 200
    assert server.engine.prompts[-1] == [ord(c) for c in PROMPT[-7:]]
    assert server.engine.params[-1].truncate_prompt_tokens == 7
    for value in (0, -2, "4", 1.5):
        assert_error(
            completion(prompt="Hi", truncate_prompt_tokens=value), 400, "truncate_prompt_tokens"
        )
        assert_error(chat(server, truncate_prompt_tokens=value), 400, "truncate_prompt_tokens")


def test_vllm_fields_the_server_cannot_honour_are_400s_naming_them(serve):
    """Silently ignored, they would answer with output other than what was asked for."""
    server = serve()

    def completion(**body):
        return server.client.post("/v1/completions", json={"prompt": "Hi", **body})

    for send in (chat, lambda server, **body: completion(**body)):
        assert_error(send(server, guided_regex="(a"), 400, "guided_regex")
        assert_error(send(server, guided_json={"type": "array"}), 400, "guided_json")
        assert_error(send(server, guided_json="{not json"), 400, "guided_json")
        assert_error(send(server, guided_json=[1]), 400, "guided_json")
        assert_error(send(server, guided_choice=[]), 400, "guided_choice")
        assert_error(send(server, guided_choice="yes"), 400, "guided_choice")
        assert_error(send(server, guided_grammar=3), 400, "guided_grammar")
        assert_error(send(server, guided_regex="a", guided_choice=["a"]), 400, "guided_choice")
        fmt = {"type": "json_object"}
        assert_error(send(server, guided_regex="a", response_format=fmt), 400, "guided_regex")
        for bad in (
            {},
            {"regex": "a", "choice": ["a"]},
            {"json_object": False},
            {"json_object": "yes"},
            {"json": {"type": "array"}},
            {"json": "{not json"},
            {"regex": "(a"},
            {"regex": 1},
            {"choice": [""]},
            {"structural_tag": "{}"},
            {"regex": "a", "whitespace_pattern": " "},
            ["regex"],
        ):
            assert_error(send(server, structured_outputs=bad), 400, "structured_outputs")
        # the engine's message names the field itself: not said twice
        broken = send(server, structured_outputs={"grammar": "start: (("})
        assert_error(broken, 400, "structured_outputs")
        message = broken.json()["error"]["message"]
        assert message.startswith("structured_outputs.grammar")
        assert message.count("structured_outputs.grammar") == 1, message
        for other in ({"guided_regex": "a"}, {"response_format": fmt}):
            so = {"regex": "a"}
            assert_error(send(server, structured_outputs=so, **other), 400, "structured_outputs")
        assert_error(send(server, use_beam_search=1), 400, "use_beam_search")
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert_error(chat(server, guided_regex="a", tools=tools), 400, "guided_regex")
    so = {"regex": "a"}
    assert_error(chat(server, structured_outputs=so, tools=tools), 400, "structured_outputs")
    assert_error(chat(server, echo=True), 400, "echo")
    assert_error(chat(server, best_of=2), 400, "best_of")
    assert_error(completion(best_of=2), 400, "best_of")
    assert server.engine.params == []
    for response in (
        chat(server, use_beam_search=False, echo=False, best_of=1, prompt_logprobs=None),
        chat(server, guided_regex="a", tools=tools, tool_choice="none"),
        completion(use_beam_search=False, best_of=1),
    ):
        assert response.status_code == 200, response.text


def test_every_vllm_field_is_honoured_or_refused(serve):
    """vLLM's fields that cannot be honoured here are a 400 naming them (their defaults
    pass); those that change nothing here are type-checked; none is silently ignored."""
    server = serve()

    def completion(**body):
        return server.client.post("/v1/completions", json={"prompt": "Hi", **body})

    both = {
        "priority": 5,
        "watermarking": True,
        "truncation_side": "right",
        "logprob_token_ids": [1],
        "return_prompt_text": True,
        "kv_transfer_params": {"do_remote_prefill": True},
        "ec_transfer_params": {"x": 1},
        "vllm_xargs": {"k": 1},
        "logits_processors": ["p"],
        "repetition_detection": {"max_pattern_size": 4},
        "stream_interval": 4,
        "thinking_token_budget": 10,
        "guided_whitespace_pattern": " ",
    }
    only_chat = {
        "chat_template": "{{ 'X' }}",
        "add_special_tokens": True,
        "include_reasoning": False,
    }
    for name, value in {**both, **only_chat}.items():
        assert_error(chat(server, **{name: value}), 400, name)
    for name, value in {**both, "prompt_embeds": "AAAA"}.items():
        assert_error(completion(**{name: value}), 400, name)
    assert_error(chat(server, priority=False), 400, "priority")  # not 0
    inert = {
        "length_penalty": "long",
        "spaces_between_special_tokens": 0,
        "session_id": 1,
        "return_token_offsets": "yes",
        "return_mm_kwargs": 1,
        "routed_experts_prompt_start": 1.5,
        "guided_decoding_backend": [],
    }
    for name, value in inert.items():
        assert_error(chat(server, **{name: value}), 400, name)
        assert_error(completion(**{name: value}), 400, name)
    assert_error(chat(server, mm_processor_kwargs=[1]), 400, "mm_processor_kwargs")
    assert_error(chat(server, documents=[{"text": 1}]), 400, "documents")
    assert_error(completion(add_special_tokens="no"), 400, "add_special_tokens")
    assert server.engine.params == []
    defaults = {
        "priority": 0,
        "watermarking": False,
        "truncation_side": "left",
        "return_token_ids": False,
        "kv_transfer_params": {},
        "vllm_xargs": {},
        "stream_interval": 1,
        "thinking_token_budget": -1,
        "length_penalty": 1.2,
        "spaces_between_special_tokens": False,
        "session_id": "s",
        "guided_decoding_backend": "xgrammar",
    }
    chat_defaults = {
        "add_special_tokens": False,
        "include_reasoning": True,
        "mm_processor_kwargs": {},
    }
    assert chat(server, **defaults, **chat_defaults).status_code == 200
    assert completion(**defaults, add_special_tokens=True).status_code == 200


class WithBos(FakeTokenizer):
    """Frames a text with a BOS (id 1) when asked to add special tokens."""

    def encode(self, text, add_special_tokens=False, max_tokens=None):
        return [1] * add_special_tokens + super().encode(text, max_tokens=max_tokens)


def test_vllm_documents_and_add_special_tokens_are_honoured(serve):
    """documents reach the chat template as its variable; add_special_tokens false leaves
    a completion prompt without the model's BOS."""

    docs = "{% for d in documents | default([]) %}[{{ d.title }}]{% endfor %}"
    server = serve(FakeEngine(tokenizer=WithBos(CHATML + docs)))
    documents = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
    assert chat(server, documents=documents).status_code == 200
    assert server.engine.prompts[-1] == [ord(c) for c in PROMPT + "[a][b]"]
    kwargs = {"documents": [{"title": "c"}]}
    assert chat(server, documents=documents, chat_template_kwargs=kwargs).status_code == 200
    assert server.engine.prompts[-1] == [ord(c) for c in PROMPT + "[c]"]
    for special, expected in ((True, [1, 72, 105]), (False, [72, 105])):
        body = {"prompt": "Hi", "max_tokens": 1, "add_special_tokens": special}
        assert server.client.post("/v1/completions", json=body).status_code == 200
        assert server.engine.prompts[-1] == expected


def test_prompt_logprobs_in_vllm_shape(serve):
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, then {token id:
    {logprob, rank, decoded_token}} for the token and the N likeliest; on each completion
    choice (a prompt's n choices alike) and on a chat response. The fake engine scores
    every token -1.0, second after "?" (-0.5)."""
    server = serve()
    post = server.client.post

    def scored(token: str, *others: tuple[str, float, int]) -> dict:
        entries = [(token, -1.0, 2), *others]
        return {str(ord(t)): {"logprob": lp, "rank": r, "decoded_token": t} for t, lp, r in entries}

    body = {"prompt": ["ab", "xyz"], "n": 2, "max_tokens": 1, "prompt_logprobs": 2}
    choices = post("/v1/completions", json=body).json()["choices"]
    # the token itself, at its rank, is not listed twice among the likeliest
    ab = [None, scored("b", ("?", -0.5, 1))]
    xyz = [None, scored("y", ("?", -0.5, 1)), scored("z", ("?", -0.5, 1))]
    assert [c["prompt_logprobs"] for c in choices] == [ab, ab, xyz, xyz]
    assert server.engine.params[-1].prompt_logprobs == 2
    # with echo, the engine scores the prompt for the larger count; each gets its own
    body = {"prompt": "ab", "max_tokens": 1, "echo": True, "logprobs": 2, "prompt_logprobs": 0}
    (choice,) = post("/v1/completions", json=body).json()["choices"]
    assert choice["prompt_logprobs"] == [None, scored("b")]
    assert choice["logprobs"]["top_logprobs"][1] == {"?": -0.5, "b": -1.0}
    assert server.engine.params[-1].prompt_logprobs == 2
    response = chat(server, max_tokens=1, n=2, prompt_logprobs=1).json()
    assert response["prompt_logprobs"][:2] == [None, scored(PROMPT[1], ("?", -0.5, 1))]
    assert len(response["prompt_logprobs"]) == len(PROMPT)
    assert all("prompt_logprobs" not in c for c in response["choices"])
    # not asked for: not there
    assert "prompt_logprobs" not in chat(server, max_tokens=1).json()
    plain = post("/v1/completions", json={"prompt": "ab", "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]  # the fake engine's tokens are characters


def test_return_token_ids_in_vllm_shape(serve):
    """vLLM's `return_token_ids`: a chat response carries `prompt_token_ids` and each
    choice its `token_ids`; a completion choice carries both (its own prompt's). In a
    stream, each choice's first chunk has the prompt's ids (a chat chunk beside its
    choices, a completion choice inside it) and the chunks' token ids add up to the
    choice's; an echoed prompt is not among a choice's token ids."""
    server = serve(FakeEngine(reply="On it." + CALLS))
    body = chat(server, n=2, return_token_ids=True).json()
    assert body["prompt_token_ids"] == ids(PROMPT)
    assert [c["token_ids"] for c in body["choices"]] == [ids("On it." + CALLS)] * 2
    chunks = stream(
        server.client,
        "/v1/chat/completions",
        {"messages": USER, "n": 2, "tools": [WEATHER_TOOL], "return_token_ids": True},
    )[:-1]
    first = {c["choices"][0]["index"]: c for c in reversed(chunks)}
    prompt = server.engine.prompts[-1]  # with the template's tool section
    assert [first[i]["prompt_token_ids"] for i in (0, 1)] == [prompt] * 2
    assert sum("prompt_token_ids" in c for c in chunks) == 2
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert [t for c in mine for t in c.get("token_ids", [])] == ids("On it." + CALLS)
    server = serve()
    post = server.client.post
    body = {"prompt": ["ab", [120, 121]], "n": 2, "max_tokens": 2, "return_token_ids": True}
    choices = post("/v1/completions", json=body).json()["choices"]
    assert [c["prompt_token_ids"] for c in choices] == [ids("ab")] * 2 + [[120, 121]] * 2
    assert [c["token_ids"] for c in choices] == [ids("He")] * 4
    body |= {"echo": True, "stream": True}
    chunks = stream(server.client, "/v1/completions", body)[:-1]
    for i, prompt in enumerate(["ab", "ab", "xy", "xy"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == ids(prompt) and mine[0]["text"] == prompt + "H"
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == ids("He")
    # not asked for: not there
    assert "prompt_token_ids" not in chat(server, max_tokens=1).json()
    plain = post("/v1/completions", json={"prompt": "ab", "max_tokens": 1}).json()
    assert "token_ids" not in plain["choices"][0]


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(serve):
    """vLLM's `return_tokens_as_token_ids`: every token a logprob entry names, the
    likeliest ones and an echoed prompt's included, is "token_id:N"; bytes and text
    offsets stay the token's own text's, and vLLM's prompt_logprobs keep decoded_token."""
    server = serve()
    body = chat(
        server, max_tokens=2, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True
    ).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["token_id:72", "token_id:101"]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["token_id:72", "token_id:63"]
    assert content[0]["bytes"] == [72] and content[0]["top_logprobs"][1]["bytes"] == [63]
    chunks = stream(
        server.client,
        "/v1/chat/completions",
        {"messages": USER, "max_tokens": 1, "logprobs": True, "return_tokens_as_token_ids": True},
    )
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["token"] == "token_id:72"
    body = {
        "prompt": "ab",
        "max_tokens": 2,
        "echo": True,
        "logprobs": 1,
        "prompt_logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    (choice,) = server.client.post("/v1/completions", json=body).json()["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["token_id:97", "token_id:98", "token_id:72", "token_id:101"]
    assert logprobs["top_logprobs"][1:] == [
        {"token_id:63": -0.5, "token_id:98": -1.0},
        {"token_id:72": -0.25},
        {"token_id:101": -0.25},
    ]
    assert logprobs["text_offset"] == [0, 1, 2, 3]
    assert choice["prompt_logprobs"][1]["98"]["decoded_token"] == "b"


def test_prompt_logprobs_limits_and_streams_are_vllms(serve):
    """A count outside [0, 20] or not an integer is a 400; a stream cannot carry them, so
    a count above 0 with `stream` is a 400 and 0 is accepted and computes nothing."""
    server = serve()

    def completion(**body):
        return server.client.post("/v1/completions", json={"prompt": "Hi", **body})

    for send in (chat, lambda server, **body: completion(**body)):
        for bad in (-1, 21, "2", 1.5, True, [1]):
            assert_error(send(server, prompt_logprobs=bad), 400, "prompt_logprobs")
        assert_error(send(server, prompt_logprobs=1, stream=True), 400, "prompt_logprobs")
    assert server.engine.params == []
    chunks = stream(server.client, "/v1/completions", {"prompt": "Hi", "prompt_logprobs": 0})
    assert chunks[-1] == "[DONE]" and all("prompt_logprobs" not in c for c in chunks[:-1])
    chunks = stream(server.client, "/v1/chat/completions", {"messages": USER, "prompt_logprobs": 0})
    assert chunks[-1] == "[DONE]" and all("prompt_logprobs" not in c for c in chunks[:-1])
    assert [p.prompt_logprobs for p in server.engine.params] == [None, None]


def test_template_errors_are_400(serve):
    engine = FakeEngine(tokenizer=FakeTokenizer("{{ raise_me() }}"))
    assert_error(chat(serve(engine)), 400, "messages")


def test_engine_failure_before_output_is_an_error_response(serve):
    r = chat(serve(FakeEngine(fail_after=0)), stream=True)
    assert_error(r, 503, code="engine_error")


def test_engine_failure_mid_stream_is_an_error_event(serve):
    chunks = stream(
        serve(FakeEngine(fail_after=3)).client, "/v1/chat/completions", {"messages": USER}
    )
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["error"]["code"] == "engine_error"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2]) == "Hel"


def test_api_keys_guard_v1_but_not_health(serve):
    server = serve(api_keys=["k1", "k2"])
    assert_error(chat(server), 401, code="invalid_api_key")
    r = server.client.post(
        "/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer nope"}
    )
    assert_error(r, 401)
    assert server.client.get("/v1/models", headers={"Authorization": "Basic k1"}).status_code == 401
    for key in ("k1", "k2"):
        ok = server.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert server.client.get("/health").status_code == 200
    assert server.client.get("/metrics").status_code == 200


# -- concurrency, disconnects, shutdown ----------------------------------------------------


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_first_chunk_reaches_the_client_before_generation_ends(serve):
    engine = FakeEngine()
    engine.hold.clear()  # the engine will not go past its first token until we say so
    server = serve(engine)
    with server.client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as response:
        received = events(response)
        assert next(received)["choices"][0]["delta"]["role"] == "assistant"
        assert next(received)["choices"][0]["delta"]["content"] == "H"
        assert engine.running  # generation is still going on
        engine.hold.set()
        rest = list(received)
    assert rest[-1] == "[DONE]"


def test_dropped_stream_aborts_the_request(serve):
    engine = FakeEngine(token_delay=0.01, reply="x" * 400)
    server = serve(engine)
    with server.client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "stream": True}
    ) as response:
        received = events(response)
        next(received), next(received)
    wait_for(lambda: engine.aborted)
    assert not engine.running and not engine.finished
    state = server.app.state.tokenmill
    wait_for(lambda: state.admission.active == 0)


def test_dropped_non_streaming_request_aborts(serve):
    engine = FakeEngine(token_delay=0.01, reply="x" * 400)
    server = serve(engine)
    with pytest.raises(httpx.ReadTimeout):
        server.client.post("/v1/chat/completions", json={"messages": USER}, timeout=0.2)
    wait_for(lambda: engine.aborted)
    assert not engine.finished
    wait_for(lambda: server.app.state.tokenmill.admission.active == 0)


def test_queue_limit_answers_429_with_retry_after(serve):
    engine = FakeEngine()
    engine.hold.clear()
    server = serve(engine, max_running_requests=1, max_waiting_requests=1, retry_after_s=3)
    with (
        server.client.stream(
            "POST", "/v1/chat/completions", json={"messages": USER, "stream": True}
        ) as a,
        server.client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as b,
    ):
        a_events, b_events = events(a), events(b)  # (dropping one would close its stream)
        next(a_events), next(b_events)
        r = chat(server)
        # a limit on requests, which OpenAI's 429s give as their type
        assert assert_error(r, 429, code="rate_limit_exceeded")["type"] == "requests"
        assert r.headers["retry-after"] == "3"
        engine.hold.set()
        assert list(a_events)[-1] == list(b_events)[-1] == "[DONE]"
    assert chat(server).status_code == 200


def test_draining_server_answers_503(serve):
    from server import start_draining

    server = serve()
    start_draining(server.app)
    refused = chat(server)
    assert_error(refused, 503, code="server_shutting_down")
    # The OpenAI SDKs retry a 503 after Retry-After (up to 120 s): a restart's length.
    assert refused.headers["retry-after"] == "30"
    assert server.client.get("/health").status_code == 503


def test_a_request_the_drain_ran_out_on_answers_503_with_retry_after(serve):
    """Still running when --shutdown-timeout ends (the engine shut down under it): the same
    Retry-After as a request refused during the drain, for the same restart to wait out."""
    server = serve(FakeEngine(fail_after=3, fail_with=EngineShutdownError))
    cut = chat(server)
    assert_error(cut, 503, code="server_shutdown")
    assert cut.headers["retry-after"] == "30"


# -- tool calls ----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)


def test_tool_calls_non_streaming(serve):
    server = serve(FakeEngine(reply=CALLS))
    body = chat(server, tools=[WEATHER_TOOL]).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    calls = message["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert "<tools>" in server.engine.tokenizer.last_prompt  # default tool section


def test_tool_calls_streaming(serve):
    server = serve(FakeEngine(reply="On it." + CALLS))
    chunks = stream(
        server.client, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER_TOOL]}
    )
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "On it."
    fragments = [tc for d in deltas for tc in d.get("tool_calls", [])]
    heads = [f for f in fragments if "id" in f]
    assert [h["index"] for h in heads] == [0, 1]
    assert all(h["type"] == "function" and h["function"]["name"] == "get_weather" for h in heads)
    assert all("id" not in f and "name" not in f["function"] for f in fragments if f not in heads)
    args = {0: "", 1: ""}
    for f in fragments:
        args[f["index"]] += f["function"]["arguments"]
    assert {k: json.loads(v) for k, v in args.items()} == {
        0: {"city": "Paris"},
        1: {"city": "Rome"},
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_call_that_repeats_an_earlier_one_ends_the_choice(serve):
    """A small model offered parallel calls (the default 135M model forced to call
    get_weather for Paris) writes the same call again until its budget runs out: the
    repeat ends the choice, the engine stops there, and the calls before it are the
    answer, streamed or not. A stream never sent the dropped call's head or arguments.
    With n choices, the engine stops once each has ended."""
    paris, rome = CALLS.split("\n</tool_call>\n")
    paris += "\n</tool_call>\n"
    again = paris.replace('"city": "Paris"', '"city":"Paris"')  # the same call, spaced apart
    server = serve(FakeEngine(reply=f"{paris}{rome}\n{again}{paris}Done."))
    made = len(f"{paris}{rome}\n{again}".rstrip())  # tokens up to the repeat's end
    for tool_choice in ("auto", "required"):
        body = chat(server, tools=[WEATHER_TOOL], tool_choice=tool_choice, n=2).json()
        assert [c["finish_reason"] for c in body["choices"]] == ["tool_calls"] * 2
        assert body["usage"]["completion_tokens"] == 2 * made
        assert server.engine.aborted[-1] == body["id"]
        (choice, _) = body["choices"]
        assert choice["message"]["content"] is None
        calls = [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
        assert calls == [{"city": "Paris"}, {"city": "Rome"}]
        request = {
            "messages": USER,
            "tools": [WEATHER_TOOL],
            "tool_choice": tool_choice,
            "stream_options": {"include_usage": True},
        }
        chunks = stream(server.client, "/v1/chat/completions", request)
        assert chunks[-2]["usage"]["completion_tokens"] == made and not chunks[-2]["choices"]
        chunks = chunks[:-2] + chunks[-1:]
        deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
        assert all(d.get("content") is None for d in deltas)
        fragments = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert [f["index"] for f in fragments if "id" in f] == [0, 1]
        args = {0: "", 1: ""}
        for f in fragments:
            args[f["index"]] += f["function"]["arguments"]
        assert [json.loads(args[i]) for i in (0, 1)] == calls
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_streamed_answer_of_calls_only_has_null_content_as_openais(serve):
    """OpenAI's stream of a turn that only calls tools opens with one chunk of the role,
    `"content": null` and the first call's head, and no chunk has content: a client that
    prints every `delta.content is not None` prints nothing. With return_token_ids the
    held-back tokens' ids come before the head, on chunks of no content after the role's.
    A turn that writes text first opens with the role and empty content, as a plain
    answer does."""
    import openai
    from openai.types.chat import ChatCompletionChunk

    server = serve(FakeEngine(reply=CALLS))
    body = {"messages": USER, "tools": [WEATHER_TOOL], "stream_options": {"include_usage": True}}
    for return_token_ids in (False, True):
        body["return_token_ids"] = return_token_ids
        chunks = stream(server.client, "/v1/chat/completions", body)[:-1]
        first = dict(chunks[0]["choices"][0]["delta"])
        assert first.pop("role") == "assistant" and first.pop("content") is None
        if return_token_ids:
            assert first == {} and chunks[1]["choices"][0]["delta"] == {}
            assert chunks[1]["choices"][0]["token_ids"] == [ord("<")]
        else:
            (head,) = first.pop("tool_calls")
            assert head["function"] == {"name": "get_weather", "arguments": ""}
        assert ("prompt_token_ids" in chunks[0]) == return_token_ids
        parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
        deltas = [c.choices[0].delta for c in parsed if c.choices]
        assert [d.content for d in deltas if d.content is not None] == []
        assert [d.role for d in deltas if d.role] == ["assistant"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    sdk = client.chat.completions.create(
        model="fake-model", messages=USER, tools=[WEATHER_TOOL], stream=True
    )
    assert all(c.choices[0].delta.content is None for c in sdk if c.choices)

    server = serve(FakeEngine(reply="On it." + CALLS))
    chunks = stream(server.client, "/v1/chat/completions", {**body, "return_token_ids": False})
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1]["content"] == "O"  # the fake engine writes a character a token


def test_a_stop_string_inside_a_call_ends_it_cut_not_as_tool_calls(serve):
    """A client's stop string that falls inside a call's arguments cuts the call, as the
    token budget does: "tool_calls" would promise arguments that do not parse."""
    server = serve(FakeEngine(reply=CALLS))
    body = chat(server, tools=[WEATHER_TOOL], stop=["Paris"]).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["arguments"] == '{"city": "'
    chunks = stream(
        server.client,
        "/v1/chat/completions",
        {"messages": USER, "tools": [WEATHER_TOOL], "stop": ["Paris"]},
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # a stop string after whole calls leaves them whole
    server = serve(FakeEngine(reply=CALLS + "\nDone."))
    body = chat(server, tools=[WEATHER_TOOL], stop=["Done"]).json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert len(body["choices"][0]["message"]["tool_calls"]) == 2


def test_a_call_cut_before_its_name_leaves_content_null_not_empty(serve):
    """The budget ran out inside the call's opening with the function not determined (the
    model may answer in text, or choose among several tools): dropped as markup, and as
    no text was written the message's content is null, as OpenAI gives when a turn has
    none. "required" with one tool determines it: that function's call, no arguments yet."""
    server = serve(FakeEngine(reply=CALLS))
    other = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    for max_tokens in (6, 20):  # inside `<tool_call>`, then inside the function's name
        for tools, tool_choice in (
            ([WEATHER_TOOL], "auto"),
            ([WEATHER_TOOL, other], "required"),
            ([WEATHER_TOOL], "required"),
        ):
            body = chat(server, tools=tools, tool_choice=tool_choice, max_tokens=max_tokens)
            (choice,) = body.json()["choices"]
            assert choice["finish_reason"] == "length"
            calls = choice["message"].pop("tool_calls", [])
            assert choice["message"] == {"role": "assistant", "content": None, "refusal": None}
            if len(tools) == 1 and tool_choice == "required":
                (call,) = calls
                assert call["function"] == {"name": "get_weather", "arguments": ""}
            else:
                assert calls == []
    # an answer that is empty by itself stays "", as OpenAI's is
    body = chat(serve(FakeEngine(reply="")), tools=[WEATHER_TOOL]).json()
    assert body["choices"][0]["message"]["content"] == ""


def test_a_forced_call_cut_before_its_name_is_a_call_of_that_function(serve):
    """tool_choice named the function, so a call the budget cut before its name is still
    that function's call, with no arguments yet, as OpenAI gives a cut call; the finish
    reason says it was cut ("length"), not that the calls are whole."""
    server = serve(FakeEngine(reply=CALLS))
    forced = {"type": "function", "function": {"name": "get_weather"}}
    body = {"tools": [WEATHER_TOOL], "tool_choice": forced}
    for max_tokens in (3, 6, 20):  # inside `<tool_call>`, then inside the function's name
        (choice,) = chat(server, max_tokens=max_tokens, **body).json()["choices"]
        assert choice["finish_reason"] == "length"
        (call,) = choice["message"].pop("tool_calls")
        assert choice["message"] == {"role": "assistant", "content": None, "refusal": None}
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"] == {"name": "get_weather", "arguments": ""}
        chunks = stream(
            server.client,
            "/v1/chat/completions",
            {**body, "messages": USER, "max_tokens": max_tokens},
        )
        deltas = [c["choices"][0] for c in chunks[:-1]]
        calls = [d["delta"]["tool_calls"][0] for d in deltas if d["delta"].get("tool_calls")]
        assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert "".join(c["function"]["arguments"] for c in calls) == ""
        assert deltas[-1]["finish_reason"] == "length"


def test_a_tool_schema_the_grammar_cannot_enforce_is_a_400_without_the_grammar(serve):
    """The message names the keyword, and quotes none of the grammar the server compiled
    the tools into."""
    server = serve()
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"uniqueItems": True}}},
        },
    }
    r = chat(server, tools=[tool], tool_choice="required")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools[0].function.parameters"
    message = r.json()["error"]["message"]
    assert "uniqueItems" in message and "<tool_call>" not in message and "\n" not in message


def test_a_strict_function_whose_schema_openai_would_refuse_is_its_400(serve):
    """The 400's shape on the wire; which schemas break OpenAI's strict rules is
    tests/server/test_structured.py's."""
    strict = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}
    r = chat(serve(), tools=[strict])
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Invalid schema for function 'get_weather': In context=(), "
        "'additionalProperties' is required to be supplied and to be false.",
        "type": "invalid_request_error",
        "param": "tools[0].function.parameters",
        "code": "invalid_function_parameters",
    }


def test_malformed_tool_call_is_returned_as_text(serve):
    # Not the grammar's canonical opening (which would make it a call at once), and the
    # arguments string is not JSON.
    broken = '<tool_call>{"name": "get_weather", "arguments": "{city: Par"}</tool_call>'
    server = serve(FakeEngine(reply=broken))
    body = chat(server, tools=[WEATHER_TOOL]).json()
    assert body["choices"][0]["message"]["content"] == broken
    assert body["choices"][0]["finish_reason"] == "stop"
    chunks = stream(
        server.client, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER_TOOL]}
    )
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == broken


def test_tool_choice_none_leaves_calls_as_text(serve):
    server = serve(FakeEngine(reply=CALLS))
    body = chat(server, tools=[WEATHER_TOOL], tool_choice="none").json()
    assert body["choices"][0]["message"]["content"] == CALLS
    assert "<tools>" not in server.engine.tokenizer.last_prompt


def test_native_tool_template_receives_the_tools(serve):
    engine = FakeEngine(reply=CALLS, tokenizer=FakeTokenizer(CHATML_WITH_TOOLS))
    server = serve(engine)
    body = chat(server, tools=[WEATHER_TOOL], parallel_tool_calls=False).json()
    assert engine.tokenizer.last_tools == [WEATHER_TOOL]
    assert engine.tokenizer.last_prompt.startswith("<tools>get_weather;</tools>")
    message = body["choices"][0]["message"]
    assert len(message["tool_calls"]) == 1  # parallel_tool_calls=false: the second is text
    assert "Rome" in message["content"]


def test_tool_call_round_trip_with_the_openai_sdk(serve):
    """A scripted model: calls get_weather, then answers from the tool's result."""
    import openai

    def model(prompt: str) -> str:
        if "<tool_response>\n18C\n</tool_response>" in prompt:
            return "It is 18C in Paris."
        return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    server = serve(FakeEngine(reply=model))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(
        model="fake-model", messages=messages, tools=[WEATHER_TOOL]
    )
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C"},
    ]
    final = client.chat.completions.create(
        model="fake-model", messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in final if c.choices)
    assert text == "It is 18C in Paris."


def test_a_prompt_scored_with_max_tokens_0_may_fill_the_window(serve):
    """max_tokens 0 with echo asks for no completion, so a prompt of the whole window
    fits; asking for one token more than the window holds does not."""
    post = serve().client.post
    ids = [72] * 2048  # the fake engine's window
    scored = post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True})
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["choices"][0]["text"] == "H" * 2048
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (2048, 0)
    continued = post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True})
    assert_error(continued, 400, "prompt", "context_length_exceeded")


def test_grammars_are_built_off_the_event_loop(serve, monkeypatch):
    """A large schema's grammar takes up to a second to build: in a worker thread (where
    llguidance releases the GIL), not on the event loop the other streams need."""
    from engine.structured_output import StructuredOutputsParams

    built_on_loop = record_event_loop_calls(monkeypatch, StructuredOutputsParams, "__post_init__")
    server = serve()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert chat(server, response_format=fmt).status_code == 200
    body = {"prompt": "Say hello", "max_tokens": 5, "response_format": fmt}
    assert server.client.post("/v1/completions", json=body).status_code == 200
    assert len(built_on_loop) == 2 and not any(built_on_loop)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 5}),
        ("/v1/completions", {"prompt": "Say hello", "logprobs": 5}),
    ],
)
def test_a_large_answer_is_encoded_off_the_event_loop(serve, monkeypatch, path, body):
    """A long answer with logprobs is a JSON body of thousands of values: encoded on the
    event loop it would hold every other stream for as long as `json.dumps` runs."""
    import server.json_body

    encoded_on_loop = record_event_loop_calls(monkeypatch, server.json_body, "encode_json")
    reply = "".join(chr(ord("a") + i % 26) for i in range(400))
    server = serve(FakeEngine(reply=reply))
    answer = server.client.post(path, json={**body, "max_tokens": 400}).json()
    assert encoded_on_loop == [False]
    choice = answer["choices"][0]
    assert choice.get("text", (choice.get("message") or {}).get("content")) == reply
    assert answer["usage"]["completion_tokens"] == 400
