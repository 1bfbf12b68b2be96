"""Regression tests for hostile input, on the fake engine: each finding of the robustness
review that the HTTP layer owns (the engine-thread findings are in test_fuzz.py, against
the real engine, and tests/test_async_llm.py)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from server.prep_process import NICENESS
from server.request_body import OFFLOAD_BYTES
from tests.server.fake_engine import FakeEngine
from tests.server.fake_tokenizer import CHATML_WITH_TOOLS, FakeTokenizer
from tests.server.sse_client import events
from tests.server.test_app import USER, assert_error, chat

CALLS = {
    "role": "assistant",
    "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for i in ("call_a", "call_b")
    ],
}
ANSWER_A = {"role": "tool", "tool_call_id": "call_a", "content": "1"}


def post_raw(server, path: str, content: bytes, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return server.client.post(path, content=content, headers=headers)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER, "stop": 5}, "stop"),
        ({"messages": USER, "stop": {"a": "b"}}, "stop"),
        ({"messages": USER, "stop": ["x"] * 17}, "stop"),
        ({"messages": USER, "stop": "x" * 257}, "stop"),
        ({"messages": USER, "stop_token_ids": 3}, "stop_token_ids"),
        ({"messages": USER, "stop_token_ids": [0x110000]}, "stop_token_ids"),
        ({"messages": USER, "stop_token_ids": list(range(257))}, "stop_token_ids"),
        ({"messages": USER, "bad_words": 5}, "bad_words"),
        ({"messages": USER, "bad_words": "darn"}, "bad_words"),
        ({"messages": USER, "bad_words": [" "]}, "bad_words"),
        ({"messages": USER, "bad_words": ["x"] * 257}, "bad_words"),
        ({"messages": USER, "bad_words": ["x" * 257]}, "bad_words"),
        ({"messages": USER, "allowed_token_ids": []}, "allowed_token_ids"),
        ({"messages": USER, "allowed_token_ids": [99999999]}, "allowed_token_ids"),
        ({"messages": USER, "skip_special_tokens": 0}, "skip_special_tokens"),
        ({"messages": USER, "ignore_eos": "false"}, "ignore_eos"),
        ({"messages": USER, "n": 2, "seed": 2**64 - 1}, "seed"),
        ({"messages": USER, "seed": 2**64}, "seed"),
        ({"messages": USER, "temperature": 10**400}, "temperature"),
        ({"messages": USER, "tool_choice": {"type": "function", "function": []}}, "tool_choice"),
        (
            {"messages": USER, "tool_choice": {"type": "function", "function": {"name": 5}}},
            "tool_choice",
        ),
        ({"messages": USER, "tool_choice": ["auto"]}, "tool_choice"),
        ({"messages": USER, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": USER, "function_call": {"name": "f"}}, "function_call"),
        ({"messages": [*USER, CALLS], "max_tokens": 4}, "messages"),  # calls left unanswered
        ({"messages": [*USER, CALLS, ANSWER_A, USER[0]]}, "messages"),  # call_b unanswered
        ({"messages": [*USER, CALLS, ANSWER_A, ANSWER_A]}, "messages"),  # answered twice
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": USER, "logit_bias": {"²": 1}}, "logit_bias"),  # isdigit, not int()
        ({"messages": USER, "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
        # refused before the prompt is counted, so it costs the user nothing
        ({"messages": USER, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ],
)
def test_values_that_once_broke_the_engine_or_the_server_are_400s(serve, body, param):
    server = serve()
    assert_error(server.client.post("/v1/chat/completions", json=body), 400, param)
    assert server.engine.params == []


def test_completion_token_ids_must_be_in_the_vocabulary(serve):
    server = serve(FakeEngine(vocab_size=1000))
    post = server.client.post
    assert_error(post("/v1/completions", json={"prompt": [1, 1000]}), 400, "prompt")
    assert_error(
        post("/v1/completions", json={"prompt": [[1], [2**70]], "echo": True}), 400, "prompt"
    )
    assert post("/v1/completions", json={"prompt": [72, 999], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(
    "content",
    [
        b'{"messages": [], "max_tokens": 1' + b"0" * 4300 + b"}",  # past Python's int digits
        b"[" * 1000 + b"]" * 1000,
        b"[" * 100_000,
        b'{"messages": ' + b"[" * 65 + b"]" * 65 + b"}",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b"\xff\xfe{}",
        b"\xff\xfe{\x00\xff",  # UTF-16 by its mark, with an odd byte left: no UTF-16
        b'{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}',
    ],
)
def test_malformed_bodies_are_400(serve, content):
    server = serve(max_body_bytes=1 << 20)
    r = post_raw(server, "/v1/chat/completions", content)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/jsonp",
    ],
)
def test_only_json_bodies_are_accepted(serve, content_type):
    server = serve()
    body = json.dumps({"messages": USER}).encode()
    assert_error(
        post_raw(server, "/v1/chat/completions", body, content_type),
        415,
        code="unsupported_media_type",
    )
    assert_error(post_raw(server, "/v1/completions", body, content_type), 415)
    assert (
        post_raw(
            server, "/v1/chat/completions", body, "application/json; charset=utf-8"
        ).status_code
        == 200
    )


def test_cors_is_off_by_default_and_opt_in(serve):
    origin = {"Origin": "https://evil.example"}
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    closed = serve()
    r = closed.client.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in chat(closed).headers

    opened = serve(allowed_origins=["https://app.example"], api_keys=["k"])
    ok = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = opened.client.options("/v1/chat/completions", headers=ok)
    assert r.status_code == 200  # answered before the key check, as browsers send no key
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = opened.client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    # The OpenAI JS SDK's own headers, and a DELETE, pass the preflight too.
    sdk = {
        **ok,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, x-stainless-os, openai-project",
    }
    r = opened.client.options("/v1/conversations/conv_1", headers=sdk)
    assert r.status_code == 200 and "DELETE" in r.headers["access-control-allow-methods"]
    r = opened.client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-expose-headers"] == "*"


def test_admission_counts_sequences(serve):
    engine = FakeEngine()
    engine.hold.clear()
    server = serve(engine, max_running_requests=2, max_waiting_requests=2)
    post = server.client.post
    error = assert_error(
        post("/v1/completions", json={"prompt": ["a"] * 1000}), 400, "prompt", "too_many_sequences"
    )
    assert "1000 sequences" in error["message"]
    assert_error(post("/v1/completions", json={"prompt": "a", "n": 5}), 400, "n")
    assert_error(chat(server, n=5), 400, "n")
    assert engine.params == []
    with server.client.stream(
        "POST", "/v1/completions", json={"prompt": ["a", "b", "c"], "stream": True}
    ) as held:
        received = events(held)
        next(received)
        # 3 of 4 sequences are taken: one more fits, two do not.
        assert_error(chat(server, n=2), 429, code="rate_limit_exceeded")
        engine.hold.set()
        assert list(received)[-1] == "[DONE]"
    assert chat(server, n=4).status_code == 200
    assert server.app.state.tokenmill.admission.active == 0


def test_prompt_size_is_bounded_before_tokenizing(serve):
    tokenizer = FakeTokenizer()
    tokenizer.encode_chat = tokenizer.encode = None  # any tokenizing would fail the test
    server = serve(FakeEngine(tokenizer=tokenizer), max_prompt_chars=1000)
    post = server.client.post
    # A body past OFFLOAD_BYTES: parsed, then counted, in the preparation process, as a
    # hostile prompt of megabytes is. (Megabytes here only took longer, up to 20 s: the
    # child runs at SCHED_IDLE, and the other pytest worker's work comes first.)
    size = 2 * OFFLOAD_BYTES
    error = assert_error(
        post("/v1/completions", json={"prompt": "x" * size}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert f"{size} characters" in error["message"]
    assert_error(
        chat(server, messages=[{"role": "user", "content": "x" * 1001}]),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert_error(
        chat(server, messages=[{"role": "user", "content": "x"}] * 3000),
        400,
        "messages",
        "context_length_exceeded",
    )


class WhereTokenizer(FakeTokenizer):
    """Writes the process and CPU priority each encode runs at to `log` (a file, since
    the preparation process has its own copy of the tokenizer)."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    def encode(self, text, add_special_tokens=False, max_tokens=None):
        with self.log.open("a") as f:
            f.write(f"{os.getpid()} {os.getpriority(os.PRIO_PROCESS, 0)}\n")
        return super().encode(text, add_special_tokens, max_tokens)


def test_large_prompts_are_prepared_in_the_low_priority_process(serve, tmp_path):
    """Rendering and tokenizing a large prompt would stall every stream: it happens in the
    preparation process, at the lowest CPU priority, where even a preempted parse holds no
    lock the server's threads need; a small prompt is done at once on the event loop."""
    log = tmp_path / "encodes"
    server = serve(FakeEngine(tokenizer=WhereTokenizer(log), max_model_len=100_000))
    post = server.client.post
    assert (
        post("/v1/completions", json={"prompt": "x" * 20_000, "max_tokens": 1}).status_code == 200
    )
    assert chat(server, messages=[{"role": "user", "content": "y" * 20_000}]).status_code == 200
    assert post("/v1/completions", json={"prompt": "small", "max_tokens": 1}).status_code == 200
    (child, low), (child_again, low_again), (here, _) = (
        tuple(map(int, line.split())) for line in log.read_text().splitlines()
    )
    assert child == child_again != os.getpid() == here
    assert low == low_again == NICENESS


def test_chat_template_kwargs_count_as_prompt_text(serve, tmp_path):
    """A template may write its variables out (a tools list, a system prompt): large ones
    are rendered in the preparation process, not on the event loop, and count toward the
    character limit, which bounds the tokenizing when truncate_prompt_tokens lifts the
    window's bound."""
    log = tmp_path / "encodes"
    tokenizer = WhereTokenizer(log)
    tokenizer.chat_template = CHATML_WITH_TOOLS
    engine = FakeEngine(tokenizer=tokenizer, max_model_len=100_000)
    server = serve(engine, max_prompt_chars=30_000)  # one server: one child to start
    variables = {"tools": [{"function": {"name": "y" * 20_000}}]}
    assert chat(server, chat_template_kwargs=variables, max_tokens=1).status_code == 200
    variables = {"tools": [{"function": {"name": "y" * 30_001}}]}
    assert_error(
        chat(server, chat_template_kwargs=variables, truncate_prompt_tokens=10),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert len(engine.params) == 1
    # One encode, in the child: the refused prompt was never tokenized.
    ((pid, priority),) = (tuple(map(int, line.split())) for line in log.read_text().splitlines())
    assert pid != os.getpid() and priority == NICENESS


def test_405_says_which_methods_are_allowed(serve):
    r = serve().client.get("/v1/chat/completions")
    assert_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_unknown_model_names_are_not_echoed_in_full(serve):
    server = serve()
    error = assert_error(
        chat(server, model="m" * 2 * OFFLOAD_BYTES), 404, "model", "model_not_found"
    )
    assert len(error["message"]) < 200


def test_a_dead_engine_makes_health_503(serve):
    engine = FakeEngine()
    server = serve(engine)
    engine.failure = RuntimeError("engine loop died")
    r = server.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "engine failed"


def test_more_messages_than_the_window_holds_are_refused_before_each_is_checked(serve):
    """Counted first: checking each of 200,000 messages would hold the GIL for a second."""
    server = serve(FakeEngine(max_model_len=64))
    messages = USER * 64 + [{"role": 5, "content": "never looked at"}]
    reply = server.client.post("/v1/chat/completions", json={"messages": messages})
    error = assert_error(reply, 400, "messages", code="context_length_exceeded")
    assert "65 messages" in error["message"]


def test_a_client_gone_before_its_body_arrived_is_no_server_failure(serve, caplog):
    """It closes the socket right after the headers and part of the body: the request is
    `rejected` (nothing was produced), not `failed`, and no error is logged."""
    server = serve()
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"messages": USER, "max_tokens": 5}).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
    deadline = time.monotonic() + 10
    metrics = ""
    while 'status="rejected"' not in metrics and time.monotonic() < deadline:
        time.sleep(0.05)
        metrics = server.client.get("/metrics").text
    chat = [line for line in metrics.splitlines() if 'endpoint="chat.completions"' in line]
    assert any('status="rejected"' in line and line.endswith(" 3.0") for line in chat), chat
    assert not any('status="failed"' in line for line in chat), chat
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert server.engine.params == []
