"""The access layer over HTTP, on the app with a scripted engine (tokens are characters)
and a real store: keys, tenant isolation, quotas, rate limits, usage rows and reports."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response as SDKResponse
from openai.types.responses.response_error import ResponseError
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from engine.errors import ContextLengthExceededError, EngineStoppedError, NothingToSampleError
from orchestrator.accounts import keys
from orchestrator.accounts import meter as meter_module
from orchestrator.accounts.periods import period_start
from orchestrator.admin import main as admin
from orchestrator.retrieval.embeddings import Embedder, Encoded
from orchestrator.store import accounts as db
from orchestrator.store.accounts import KeyRow, UserRow
from orchestrator.store.tables import files, quota_periods, responses
from tests.product.conftest import ProductServer
from tests.product.test_responses_api import _usage_checkpoints, _wait_for_generation
from tests.product.test_responses_tools import CALCULATOR, _call, _scripted
from tests.server.conftest import SSL_CONTEXT
from tests.server.fake_engine import FakeEngine
from tests.server.sse_client import events

MODEL = "fake-model"
REPLY = "Hello, world!"  # 13 tokens


def _account(server: ProductServer, name: str, **limits) -> str:
    """A user with one key; returns the key."""
    repo = server.product.store.repo
    user = UserRow(f"user_{name}", name, int(time.time()), **limits)
    assert db.create_user(repo, user)
    secret = keys.new_secret()
    db.add_key(repo, KeyRow(keys.new_key_id(), user.id, keys.hint(secret), 1), keys.digest(secret))
    return secret


def _client(server: ProductServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        base_url=f"{server.url}/v1", headers=headers, timeout=20, verify=SSL_CONTEXT
    )


def _chat(client: httpx.Client, **extra) -> httpx.Response:
    return client.post(
        "/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **extra},
    )


def _rows(
    server: ProductServer, user_id: str | object | None = db._ANY, count: int | None = None
) -> list[db.UsageRecord]:
    """The usage rows, waiting (a stream's row is written as it closes) for `count`."""
    deadline = time.monotonic() + 10
    while True:
        rows = db.usage_rows(server.product.store.repo, user_id)
        if count is None or len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def test_each_users_prompts_are_cached_apart(product_server):
    """Chat, completions and responses reach the engine salted with their user, so one
    user's cached prompt blocks neither serve nor reveal another's; the operator's keys and
    an open server's requests share the unsalted cache."""
    server = product_server(api_keys=["operator-key"])
    keys = [_account(server, name) for name in ("alice", "bob")]
    for key in [*keys, "operator-key"]:
        with _client(server, key) as client:
            assert _chat(client).status_code == 200
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
            assert client.post("/completions", json=body).status_code == 200
            body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4}
            assert client.post("/responses", json=body).status_code == 200
    salts = [p.cache_salt for p in server.engine.params]
    assert salts == ["user_alice"] * 3 + ["user_bob"] * 3 + [None] * 3


def _quota(server: ProductServer, user_id: str) -> db.QuotaState:
    return db.quota_state(server.product.store.repo, user_id, 0)


def test_the_server_is_open_until_a_key_is_issued_then_every_v1_route_needs_one(product_server):
    server = product_server(api_keys=["operator-key"])
    with _client(server, "operator-key") as operator:
        assert _chat(operator).status_code == 200
    with _client(server, None) as anonymous:
        assert anonymous.get("/models").status_code == 401
    open_server = product_server()
    with _client(open_server, None) as anonymous:
        assert _chat(anonymous).status_code == 200
        key = _account(open_server, "alice")
        for path in ("/models", "/usage", "/responses/resp_x", "/conversations/conv_x"):
            refused = anonymous.get(path)
            assert refused.status_code == 401
            assert refused.json() == {
                "error": {
                    "message": "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
    with pytest.raises(openai.AuthenticationError):  # the SDK's client has no valid key
        open_server.client.models.list()
    with _client(open_server, key + "x") as wrong:
        assert wrong.get("/models").status_code == 401
    with _client(open_server, key) as alice:
        assert _chat(alice).status_code == 200
        key_id = db.list_keys(open_server.product.store.repo, "user_alice")[0].id
        assert db.revoke_key(open_server.product.store.repo, key_id, int(time.time()))
        assert _chat(alice).status_code == 401  # refused at once
    assert open_server.engine.prompts  # health and metrics stay open
    assert httpx.get(f"{open_server.url}/health").status_code == 200


def test_a_key_lookup_the_database_cannot_answer_is_a_503_to_retry(product_server, monkeypatch):
    """Every request with a key needs the database (nothing is cached): while it does not
    answer, the key check is the 503 `database_unavailable` with Retry-After that any
    other request needing it gets, not a 500 for a failure of the server's own."""
    server = product_server()
    key = _account(server, "dee")

    def unreachable(*_args):
        raise OperationalError("SELECT ...", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(db, "find_key", unreachable)
    with _client(server, key) as dee:
        for answer in (dee.get("/models"), _chat(dee)):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "database_unavailable"
            assert answer.headers["retry-after"] == "5"
    fresh = product_server()  # not yet closed: a request without a key asks if it may be
    monkeypatch.setattr(db, "any_keys", unreachable)
    with _client(fresh, None) as anyone:
        answer = anyone.get("/models")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "database_unavailable"


EXPIRED = (
    "This API key has expired: ask the operator for a new one, and send it as "
    "'Authorization: Bearer <key>'."
)


def test_a_key_past_its_expiry_on_the_servers_clock_is_a_401_that_says_it_expired(
    product_server, caplog
):
    """An expiring key works until the server's clock reaches its expiry, then is refused
    as an unknown key is (401, `invalid_api_key`, nothing metered), with a message saying
    it expired and naming no key material; a key without an expiry goes on working."""
    server = product_server()
    repo = server.product.store.repo
    user = UserRow("user_ed", "ed", 1)
    assert db.create_user(repo, user)
    now = int(time.time())
    expiring, lasting = keys.new_secret(), keys.new_secret()
    key = KeyRow("key_ed", user.id, keys.hint(expiring), 1, expires_at=now + 3600)
    db.add_key(repo, key, keys.digest(expiring))
    db.add_key(repo, KeyRow("key_ed2", user.id, keys.hint(lasting), 1), keys.digest(lasting))
    with _client(server, expiring) as ed:
        assert _chat(ed).status_code == 200
        server.product.accounts.clock = lambda: now + 3600
        for refused in (ed.get("/models"), _chat(ed)):
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json() == {
                "error": {
                    "message": EXPIRED,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=expiring, max_retries=0)
    with sdk, pytest.raises(openai.AuthenticationError, match="has expired"):
        sdk.models.list()
    with _client(server, lasting) as ed:
        assert _chat(ed).status_code == 200
    assert len(_rows(server, user.id)) == 2  # the refusals are not metered
    assert expiring not in caplog.text and key.hint not in caplog.text


class _UnusedEmbedder:
    """Vector stores need an embedder; a cross-user request must fail before using it."""

    name, dimensions, vocab_size = "unused", 384, 1000

    def __getattr__(self, name: str):
        raise AssertionError(f"the embedder was used ({name})")


def test_another_users_ids_answer_404_like_unknown_ids_on_every_route(product_server, tmp_path):
    server = product_server(data_dir=tmp_path / "data", embedder=_UnusedEmbedder())
    alice_key, bob_key = _account(server, "alice"), _account(server, "bob")
    with _client(server, alice_key) as alice, _client(server, bob_key) as bob:
        response = alice.post(
            "/responses", json={"model": MODEL, "input": "x", "background": True}
        ).json()
        conversation = alice.post(
            "/conversations", json={"items": [{"type": "message", "role": "user", "content": "hi"}]}
        ).json()
        item = alice.get(f"/conversations/{conversation['id']}/items").json()["data"][0]
        file = alice.post(
            "/files",
            files={"file": ("a.txt", io.BytesIO(b"secret"))},
            data={"purpose": "assistants"},
        ).json()
        store = alice.post("/vector_stores", json={"name": "s"}).json()
        r, c, f, v = response["id"], conversation["id"], file["id"], store["id"]
        routes = [
            ("GET", f"/responses/{r}", None),
            ("GET", f"/responses/{r}?stream=true", None),
            ("DELETE", f"/responses/{r}", None),
            ("POST", f"/responses/{r}/cancel", None),
            ("GET", f"/responses/{r}/input_items", None),
            ("POST", "/responses", {"model": MODEL, "input": "x", "previous_response_id": r}),
            ("POST", "/responses", {"model": MODEL, "input": "x", "conversation": c}),
            ("GET", f"/conversations/{c}", None),
            ("POST", f"/conversations/{c}", {"metadata": {"a": "b"}}),
            ("DELETE", f"/conversations/{c}", None),
            ("GET", f"/conversations/{c}/items", None),
            (
                "POST",
                f"/conversations/{c}/items",
                {"items": [{"type": "message", "role": "user", "content": "x"}]},
            ),
            ("GET", f"/conversations/{c}/items/{item['id']}", None),
            ("DELETE", f"/conversations/{c}/items/{item['id']}", None),
            ("GET", f"/files/{f}", None),
            ("GET", f"/files/{f}/content", None),
            ("DELETE", f"/files/{f}", None),
            ("GET", f"/vector_stores/{v}", None),
            ("POST", f"/vector_stores/{v}", {"name": "t"}),
            ("DELETE", f"/vector_stores/{v}", None),
            ("POST", f"/vector_stores/{v}/search", {"query": "secret"}),
            ("GET", f"/vector_stores/{v}/files", None),
            ("POST", f"/vector_stores/{v}/files", {"file_id": f}),
            ("GET", f"/vector_stores/{v}/files/{f}", None),
            ("DELETE", f"/vector_stores/{v}/files/{f}", None),
            ("POST", f"/vector_stores/{v}/file_batches", {"file_ids": [f]}),
            (
                "POST",
                "/responses",
                {
                    "model": MODEL,
                    "input": "x",
                    "tools": [{"type": "file_search", "vector_store_ids": [v]}],
                },
            ),
        ]
        for method, path, body in routes:
            answer = bob.request(method, path, json=body)
            assert answer.status_code == 404, (method, path, answer.text)
            unknown = (
                path.replace(r, "resp_0")
                .replace(c, "conv_0")
                .replace(f, "file-0")
                .replace(v, "vs_0")
            )
            assert bob.request(method, unknown, json=body).status_code == 404
        assert bob.get("/files").json()["data"] == []
        assert bob.get("/vector_stores").json()["data"] == []
        # Alice's objects are all still there.
        assert alice.get(f"/responses/{r}").status_code == 200
        assert alice.get(f"/conversations/{c}/items").json()["data"] == [item]
        assert alice.get(f"/files/{f}/content").content == b"secret"
        assert alice.get(f"/vector_stores/{v}").status_code == 200


def test_over_quota_is_a_429_insufficient_quota_before_any_compute_and_others_go_on(product_server):
    server = product_server()
    alice_key = _account(server, "alice", token_quota=100, quota_period="day")
    bob_key = _account(server, "bob")
    with _client(server, alice_key) as alice, _client(server, bob_key) as bob:
        prompt = len("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert _chat(alice, max_tokens=13).status_code == 200  # prompt + 13 <= 100
        prompts_before = len(server.engine.prompts)
        refused = _chat(alice, max_tokens=13)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
        assert error["param"] is None and "quota" in error["message"]
        assert refused.headers["x-should-retry"] == "false"  # the SDKs' retries would not fit
        assert f"needs up to {prompt + 13} tokens" in error["message"]
        assert f"more than the {100 - prompt - 13} left of your 100-token day" in error["message"]
        assert len(server.engine.prompts) == prompts_before  # nothing reached the engine
        assert _chat(bob, max_tokens=13).status_code == 200
        report = alice.get("/usage").json()
    assert report["quota"]["used"] == prompt + 13 and report["quota"]["reserved"] == 0
    assert report["quota"]["remaining"] == 100 - prompt - 13
    assert [r.status for r in _rows(server, "user_alice")] == ["completed"]  # a refusal has none


def test_a_flood_of_refusals_leaves_no_usage_rows_and_writes_nothing(
    product_server, database_url, monkeypatch
):
    """A key holder can send refusals (rpm and quota 429s, 400s) by the thousand a second:
    they cost nothing, so they leave no usage row (the table would grow without bound) and,
    but for the quota's own check, no work for the store; the report counts the requests
    that ran, and /metrics the refusals. Each refusal takes the same path, so 30 of each
    kind show a row or a write per refusal as surely as thousands would."""
    settled: list[str] = []
    settle = db.settle

    def settling(repo, reservation_id, record, *args) -> None:
        settled.append(record.status)
        settle(repo, reservation_id, record, *args)

    monkeypatch.setattr(db, "settle", settling)
    server = product_server(database_url=database_url)
    server.product.accounts.limiter.clock = lambda: 0.0  # no refill: alice stays refused
    limited = _account(server, "alice", rpm=1)
    quota = _account(server, "bob", token_quota=60, quota_period="day")
    with _client(server, limited) as alice, _client(server, quota) as bob:
        assert _chat(alice, max_tokens=5).status_code == 200
        assert _chat(bob, max_tokens=5).status_code == 200
        codes = [_chat(alice, max_tokens=5).status_code for _ in range(30)]
        codes += [_chat(bob, max_tokens=50).status_code for _ in range(30)]
        codes += [
            bob.post("/chat/completions", json={"model": MODEL}).status_code for _ in range(30)
        ]
        assert codes == [429] * 60 + [400] * 30
        [day] = alice.get("/usage").json()["data"]
        metrics = httpx.get(f"{server.url}/metrics").text
    assert day["requests"] == 1
    assert [r.status for r in _rows(server)] == ["completed", "completed"]
    assert settled == ["completed", "completed"]
    assert (
        'tokenmill:endpoint_requests_total{endpoint="chat.completions",status="rejected"} 90.0'
        in metrics
    )


def test_a_request_refused_after_its_prompt_went_in_is_reported_as_it_is_charged(
    product_server,
):
    """Constraints that leave nothing to sample are a 400 only once the engine has the
    prompt: the quota charges that prompt, so the usage report must show it (as a
    `failed` row, not a `rejected` one, which the report leaves out as costing nothing)."""
    server = product_server(FakeEngine(fail_after=0, fail_with=NothingToSampleError))
    key = _account(server, "alice", token_quota=1000, quota_period="day")
    with _client(server, key) as alice:
        refused = _chat(alice, max_tokens=5)
        assert refused.status_code == 400
        report = alice.get("/usage").json()
    [row] = _rows(server, "user_alice", count=1)
    assert row.status == "failed" and row.input_tokens > 0
    assert report["quota"]["used"] == row.total_tokens
    assert sum(day["total_tokens"] for day in report["data"]) == row.total_tokens


class SubmissionRefusingEngine(FakeEngine):
    """Refuses every prompt as it is submitted, as LLMEngine does a prompt longer than
    its context: before computing any of it."""

    async def generate(self, prompt, params, request_id, on_abort=None):
        raise ContextLengthExceededError(f"the prompt has {len(prompt)} tokens, too many")
        yield  # an async generator, as AsyncLLM.generate


def test_a_prompt_the_engine_refuses_at_submission_is_not_charged(product_server):
    """The engine computed none of it: chat's 400 is a refusal (no usage row), and a
    response that fails on it used no input tokens; the quota holds nothing of either."""
    server = product_server(SubmissionRefusingEngine())
    key = _account(server, "hal", token_quota=1000, quota_period="day")
    with _client(server, key) as hal:
        refused = _chat(hal, max_tokens=5)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 16}
        failed = hal.post("/responses", json=body).json()
        assert failed["status"] == "failed" and failed["usage"]["input_tokens"] == 0
        assert failed["error"]["code"] == "invalid_prompt"
        assert "too many" in failed["error"]["message"]
        report = hal.get("/usage").json()
    assert report["quota"]["used"] == 0 and report["quota"]["reserved"] == 0
    rows = _rows(server, "user_hal", count=1)
    assert [(r.endpoint, r.status, r.total_tokens) for r in rows] == [("responses", "failed", 0)]


class StoppedEngine(FakeEngine):
    """Shut down: refuses every prompt as it is submitted, as AsyncLLM does the requests
    a drain admits once its shutdown timeout has stopped the engine."""

    async def generate(self, prompt, params, request_id, on_abort=None):
        raise EngineStoppedError("the engine is shut down")
        yield  # an async generator, as AsyncLLM.generate

    async def beam_search(self, prompt, params, request_id, on_abort=None):
        raise EngineStoppedError("the engine is shut down")
        yield  # an async generator, as AsyncLLM.beam_search


def test_a_prompt_submitted_after_the_engine_stopped_is_not_charged(product_server):
    """A request admitted as the server drains (queued behind its user's share while the
    shutdown timeout ended the others) reaches an engine already stopped: it fails as the
    shutdown's requests do, but none of its prompt was computed, so none is charged."""
    server = product_server(StoppedEngine())
    key = _account(server, "stu", token_quota=1000, quota_period="day")
    with _client(server, key) as stu:
        for extra in ({}, {"use_beam_search": True}):
            refused = _chat(stu, max_tokens=5, **extra)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "server_shutdown"
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 16}
        failed = stu.post("/responses", json=body).json()
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert failed["usage"]["input_tokens"] == 0
        report = stu.get("/usage").json()
    assert report["quota"]["used"] == 0 and report["quota"]["reserved"] == 0
    rows = _rows(server, "user_stu", count=3)
    assert sorted((r.endpoint, r.status, r.total_tokens) for r in rows) == [
        ("chat.completions", "failed", 0),
        ("chat.completions", "failed", 0),
        ("responses", "failed", 0),
    ]


def test_a_stream_refused_before_its_first_event_carries_the_rate_limit_headers(
    product_server,
):
    """A stream whose generation fails before its first event is answered as a JSON
    error, with the x-ratelimit-* headers every answer of a limited user carries, as the
    same request unstreamed is."""
    server = product_server(SubmissionRefusingEngine())
    key = _account(server, "ida", rpm=100, tpm=100_000)
    with _client(server, key) as ida:
        answers = [_chat(ida, max_tokens=5, stream=stream) for stream in (False, True)]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "context_length_exceeded"
        assert answer.headers["x-ratelimit-limit-requests"] == "100"
        assert answer.headers["x-ratelimit-limit-tokens"] == "100000"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "98"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_fifty_concurrent_requests_never_overspend_the_quota(
    product_server, database_url, endpoint
):
    """Each request reserves its prompt + 13 tokens; the quota fits 10 of them at once. The
    tokens reach the engine only for admitted requests, and the database agrees."""
    engine = FakeEngine(reply=REPLY, token_delay=0.005)
    server = product_server(engine, database_url=database_url)
    with _client(server, None) as probe:  # the prompt's size, before accounts exist
        probe_usage = _chat(probe, max_tokens=13).json()["usage"]
    prompt = probe_usage["prompt_tokens"] if endpoint == "chat" else 0
    if endpoint == "responses":
        with _client(server, None) as probe:
            prompt = probe.post(
                "/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 13}
            ).json()["usage"]["input_tokens"]
    limit = 10 * (prompt + 13) + 5
    key = _account(server, "alice", token_quota=limit, quota_period="month")
    barrier = threading.Barrier(50)

    def request(_: int) -> httpx.Response:
        with _client(server, key) as alice:
            barrier.wait()
            if endpoint == "chat":
                return _chat(alice, max_tokens=13)
            return alice.post(
                "/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 13}
            )

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(request, range(50)))
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(ok) + len(refused) == 50 and 10 <= len(ok) < 50
    assert all(a.json()["error"]["code"] == "insufficient_quota" for a in refused)
    spent = sum(a.json()["usage"]["total_tokens"] for a in ok)
    rows = _rows(server, "user_alice", count=len(ok))
    with server.product.store.engine.connect() as conn:
        used, reserved = conn.execute(
            select(func.sum(quota_periods.c.used), func.sum(quota_periods.c.reserved))
        ).one()
    assert used == spent <= limit and reserved == 0
    assert sum(r.total_tokens for r in rows) == spent
    assert [r.status for r in rows] == ["completed"] * len(ok)


def _send(client: httpx.Client, kind: str, max_tokens: int) -> httpx.Response:
    """One generation request of `kind` (the property below mixes them)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    if kind == "stream":
        with client.stream(
            "POST", "/chat/completions", json={**chat, "max_tokens": max_tokens, "stream": True}
        ) as streamed:
            streamed.read()
            return streamed
    bodies = {
        "chat": ("/chat/completions", {**chat, "max_tokens": max_tokens}),
        "chat n=2": ("/chat/completions", {**chat, "max_tokens": max_tokens, "n": 2}),
        "completions": ("/completions", {"prompt": ["ab", "cd"], "max_tokens": max_tokens}),
        "responses": ("/responses", {"input": "Hi", "max_output_tokens": max_tokens}),
        "tool loop": ("/responses", {**TOOL_TURN, "max_output_tokens": 100 + max_tokens}),
    }
    path, body = bodies[kind]
    return client.post(path, json={"model": MODEL, **body})


def test_property_concurrent_requests_of_every_kind_never_overspend_the_quota(product_server):
    """Any mix of one user's requests sent at once (chat, n > 1, streamed, batched
    completions, responses, tool loops whose later model turns extend the reservation)
    against any quota: each is answered or refused with `insufficient_quota` (a tool loop
    the quota cuts fails), the quota charges what the usage rows hold, never more than the
    limit, holds nothing once they end, and another user's request beside them is charged
    its own tokens only."""
    script = _scripted(_call("calculator", expression="6 * 7"))
    server = product_server(FakeEngine(reply=script, token_delay=0.002))
    bystander = _account(server, "by", token_quota=10**9, quota_period="total")
    kinds = ["chat", "chat n=2", "stream", "completions", "responses", "tool loop"]

    @settings(max_examples=10, deadline=None)
    @given(
        st.integers(50, 3000),
        st.lists(st.tuples(st.sampled_from(kinds), st.integers(1, 30)), min_size=2, max_size=10),
    )
    def spend(limit: int, requests: list[tuple[str, int]]) -> None:
        user_id = f"user_{keys.new_key_id()}"
        name = user_id.removeprefix("user_")
        key = _account(server, name, token_quota=limit, quota_period="total")
        barrier = threading.Barrier(len(requests) + 1)

        def send(secret: str, kind: str, max_tokens: int) -> httpx.Response:
            with _client(server, secret) as client:
                barrier.wait()
                return _send(client, kind, max_tokens)

        with ThreadPoolExecutor(len(requests) + 1) as pool:
            beside = pool.submit(send, bystander, "chat", 5)
            answers = list(pool.map(lambda r: send(key, *r), requests))
        for answer in answers:
            assert answer.status_code in (200, 429), answer.text
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "insufficient_quota"
        rows = _rows(server, user_id, count=sum(a.status_code == 200 for a in answers))
        state = _quota(server, user_id)
        assert state.used == sum(r.total_tokens for r in rows) <= limit and state.reserved == 0
        assert beside.result().status_code == 200
        theirs = _rows(server, "user_by")
        assert _quota(server, "user_by").used == sum(r.total_tokens for r in theirs)
        assert _quota(server, "user_by").reserved == 0

    spend()


def test_property_concurrent_requests_never_pass_the_rpm_or_tpm(product_server):
    """Any mix of one user's requests sent at once (no tool loops, whose later turns may
    go into debt) against any rpm and tpm, on a clock that does not move (no refill): the
    admitted ones are at most rpm, and what they used at most tpm; the others are 429s
    naming the limit reached as their type, and none of them has a usage row."""
    server = product_server(FakeEngine(reply="abcdefghij", token_delay=0.002))
    server.product.accounts.limiter.clock = lambda: 0.0
    kinds = ["chat", "chat n=2", "stream", "completions", "responses"]

    @settings(max_examples=10, deadline=None)
    @given(
        st.integers(60, 1500),
        st.integers(1, 12),
        st.lists(st.tuples(st.sampled_from(kinds), st.integers(1, 30)), min_size=2, max_size=12),
    )
    def send_all(tpm: int, rpm: int, requests: list[tuple[str, int]]) -> None:
        user_id = f"user_{keys.new_key_id()}"
        key = _account(server, user_id.removeprefix("user_"), rpm=rpm, tpm=tpm)
        barrier = threading.Barrier(len(requests))

        def send(kind: str, max_tokens: int) -> httpx.Response:
            with _client(server, key) as client:
                barrier.wait()
                return _send(client, kind, max_tokens)

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: send(*r), requests))
        admitted = [a for a in answers if a.status_code == 200]
        for answer in answers:
            assert answer.status_code in (200, 429), answer.text
            if answer.status_code == 429:
                error = answer.json()["error"]
                assert error["code"] == "rate_limit_exceeded"
                assert error["type"] in ("requests", "tokens")
        rows = _rows(server, user_id, count=len(admitted))
        assert len(rows) == len(admitted) <= rpm
        assert sum(r.total_tokens for r in rows) <= tpm

    send_all()


def test_rate_limits_answer_429_with_retry_after_and_every_answer_carries_the_headers(
    product_server,
):
    server = product_server()
    key = _account(server, "alice", rpm=2, tpm=10_000)
    with _client(server, key) as alice:
        first = _chat(alice, max_tokens=5)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 10_000
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        with alice.stream(
            "POST",
            "/chat/completions",
            json={
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 5,
            },
        ) as streamed:
            assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
            streamed.read()
        limited = _chat(alice, max_tokens=5)
        assert limited.status_code == 429
        # OpenAI's rate-limit error names the limit reached as its type
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.json()["error"]["type"] == "requests"
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    tokens_key = _account(server, "bob", tpm=100)
    with _client(server, tokens_key) as bob:
        too_big = _chat(bob, max_tokens=500)
        assert too_big.status_code == 429 and too_big.headers["x-ratelimit-limit-tokens"] == "100"
        assert too_big.json()["error"]["type"] == "tokens"
        assert "retry-after" not in too_big.headers  # it can never fit the limit
        assert too_big.headers["x-should-retry"] == "false"
        assert "x-should-retry" not in limited.headers  # it fits after retry-after
        assert _chat(bob, max_tokens=20).status_code == 200
        refused = _chat(bob, max_tokens=60)
        assert refused.status_code == 429  # the bucket holds ~100 - used
        assert refused.json()["error"]["type"] == "tokens"
        [day] = bob.get("/usage").json()["data"]
        assert day["requests"] == 1  # refusals cost nothing and are not reported
    assert [r.status for r in _rows(server, "user_bob")] == ["completed"]


def test_a_request_refused_for_its_tokens_spends_none_of_the_minutes_requests(product_server):
    """A tpm 429 never ran: a client retrying too large a request keeps its rpm."""
    server = product_server()
    server.product.accounts.limiter.clock = lambda: 0.0  # no refill: only what was taken shows
    key = _account(server, "gus", rpm=2, tpm=150)
    with _client(server, key) as gus:
        too_big = _chat(gus, max_tokens=500)
        assert too_big.status_code == 429 and "tokens" in too_big.json()["error"]["message"]
        assert too_big.headers["x-ratelimit-remaining-requests"] == "2"
        answers = [_chat(gus, max_tokens=5) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        assert _chat(gus, max_tokens=5).status_code == 429  # the rpm's two are spent


def test_the_rate_limit_headers_are_what_is_left_after_the_requests_reservation(
    product_server,
):
    """OpenAI's remaining-* headers: the window after this request's reservation (prompt +
    max_tokens), not the bucket after the request ran and gave back what it did not use."""
    server = product_server()
    server.product.accounts.limiter.clock = lambda: 0.0  # no refill: only what was taken shows
    key = _account(server, "fay", rpm=10, tpm=1000)
    with _client(server, key) as fay:
        answer = _chat(fay, max_tokens=50)
    assert answer.status_code == 200
    usage = answer.json()["usage"]
    assert usage["completion_tokens"] < 50  # the request gave tokens back when it ended
    reserved = usage["prompt_tokens"] + 50
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(1000 - reserved)
    assert answer.headers["x-ratelimit-remaining-requests"] == "9"


def test_usage_rows_add_up_to_what_the_responses_reported_and_the_report_has_its_shape(
    product_server,
):
    server = product_server(FakeEngine(reply=REPLY))
    key = _account(server, "alice", token_quota=100_000, quota_period="month")
    reported = 0
    with _client(server, key) as alice:
        reported += _chat(alice).json()["usage"]["total_tokens"]
        with alice.stream(
            "POST",
            "/chat/completions",
            json={
                "model": MODEL,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Hi"}],
            },
        ) as streamed:
            chunks = [e for e in events(streamed) if isinstance(e, dict)]
        reported += chunks[-1]["usage"]["total_tokens"]
        batch = alice.post(
            "/completions", json={"model": MODEL, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 4}
        ).json()
        assert batch["usage"]["completion_tokens"] == 16
        reported += batch["usage"]["total_tokens"]
        response = SDKResponse.model_validate(
            alice.post("/responses", json={"model": MODEL, "input": "Hi"}).json()
        )
        reported += response.usage.total_tokens
        with alice.stream(
            "POST", "/responses", json={"model": MODEL, "input": "Yo", "stream": True}
        ) as streamed:
            final = [e for e in events_named(streamed)][-1]
        reported += final["response"]["usage"]["total_tokens"]
        rows = _rows(server, "user_alice", count=5)
        report = alice.get("/usage").json()
    assert sorted((r.endpoint, r.status) for r in rows) == [
        ("chat.completions", "completed"),
        ("chat.completions", "completed"),
        ("completions", "completed"),
        ("responses", "completed"),
        ("responses", "completed"),
    ]
    assert sum(r.total_tokens for r in rows) == reported
    assert all(
        r.model == MODEL
        and r.key_id.startswith("key_")
        and r.duration > 0
        and r.ttft is not None
        and r.queue_time is not None
        for r in rows
    )
    assert set(report) == {"object", "user", "quota", "storage", "data", "has_more", "next_page"}
    assert report["has_more"] is False and report["next_page"] is None
    assert report["object"] == "usage.report" and report["user"] == "alice"
    quota = report["quota"]
    assert set(quota) == {"limit", "period", "used", "reserved", "remaining", "resets_at"}
    assert quota["limit"] == 100_000 and quota["period"] == "month"
    assert quota["used"] == reported and quota["reserved"] == 0
    assert quota["remaining"] == 100_000 - reported and quota["resets_at"] > time.time()
    [day] = report["data"]
    assert set(day) == {
        "date",
        "model",
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "total_tokens",
    }
    assert day["requests"] == 5 and day["total_tokens"] == reported and day["model"] == MODEL
    assert day["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'tokenmill:endpoint_tokens_total{endpoint="completions",kind="output"} 16.0' in metrics
    assert (
        'tokenmill:endpoint_requests_total{endpoint="responses",status="completed"} 2.0' in metrics
    )
    assert "alice" not in metrics


def events_named(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def _past_usage(server: ProductServer, user_id: str, days: int, model: str) -> None:
    """A usage row of `user_id` on each of the `days` days before today, 10 tokens each."""
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0).timestamp()
    for back in range(days, 0, -1):
        when = today - back * 86400
        record = db.UsageRecord(
            user_id, None, "chat.completions", model, 7, 0, 3, "completed", 0, 0, 1, when
        )
        db.settle(server.product.store.repo, None, record)


def test_the_usage_report_pages_its_days_and_shows_only_the_callers(product_server):
    """`data` holds at most `limit` days (31 by default), oldest first, the last `limit`
    days without `since`; `has_more` and `next_page` (the next page's `since`) lead
    through the rest, and the pages together are the caller's whole report, never another
    user's rows."""
    server = product_server()
    alice, bob = _account(server, "alice"), _account(server, "bob")
    _past_usage(server, "user_alice", 40, MODEL)
    _past_usage(server, "user_alice", 3, "other-model")  # two entries on the last 3 days
    _past_usage(server, "user_bob", 45, MODEL)
    with _client(server, alice) as client:
        everything = db.usage_by_day(server.product.store.repo, "user_alice")
        whole = [day.report() for day in everything]
        first = client.get("/usage").json()
        month = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%d")
        assert first["data"] == [d for d in whole if d["date"] >= month]
        assert len({d["date"] for d in first["data"]}) == 30  # every day but today's
        assert first["has_more"] is False and first["next_page"] is None
        pages, since = [], "2000-01-01"
        while True:
            page = client.get("/usage", params={"limit": 4, "since": since}).json()
            assert len({d["date"] for d in page["data"]}) <= 4
            pages.append(page)
            if not page["has_more"]:
                assert page["next_page"] is None
                break
            since = page["next_page"]
        assert [d for page in pages for d in page["data"]] == whole
        assert len(pages) == 10 and len(pages[-1]["data"]) == 4 + 3  # 4 days, 2 models on 3
        assert all(page["quota"] == first["quota"] for page in pages)
        for limit in ("0", "101", "x", "1.5"):
            refused = client.get("/usage", params={"limit": limit})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "limit"
    with _client(server, bob) as client:
        report = client.get("/usage", params={"limit": 100}).json()
    assert report["has_more"] is False and len(report["data"]) == 45
    assert report["user"] == "bob" and {d["model"] for d in report["data"]} == {MODEL}


def test_the_usage_report_answers_on_every_database(product_server, database_url, tmp_path):
    """PostgreSQL sums a BIGINT column as NUMERIC (a Decimal in Python): the report's
    byte count must still be a JSON integer there."""
    server = product_server(database_url=database_url, data_dir=tmp_path / "data")
    key = _account(server, "alice", storage_quota_bytes=1000)
    with _client(server, key) as alice:
        upload = alice.post(
            "/files", files={"file": ("a.txt", b"hello")}, data={"purpose": "assistants"}
        )
        assert upload.status_code == 200, upload.text
        report = alice.get("/usage")
    assert report.status_code == 200, report.text
    assert report.json()["storage"] == {"limit_bytes": 1000, "used_bytes": 5}


def test_a_disconnect_and_a_cancel_settle_the_reservation(product_server):
    engine = FakeEngine(reply="abcdefghijklmnopqrstuvwxyz", token_delay=0.02)
    server = product_server(engine)
    key = _account(server, "alice", token_quota=10_000, quota_period="total")
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "stream": True,
            "max_tokens": 26,
            "messages": [{"role": "user", "content": "x"}],
        },
    ) as stream:
        for n, _ in enumerate(events(stream)):
            if n == 3:
                break
    [row] = _rows(server, "user_alice", count=1)
    assert row.status == "incomplete" and 1 <= row.output_tokens < 26
    with _client(server, key) as alice:
        started = threading.Event()

        def stream_response() -> None:
            with alice.stream(
                "POST",
                "/responses",
                json={"model": MODEL, "input": "x", "stream": True, "background": True},
            ) as streamed:
                for line in streamed.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if event["type"] == "response.output_text.delta":
                            holder.append(event)
                            started.set()

        holder: list[dict] = []
        thread = threading.Thread(target=stream_response)
        thread.start()
        assert started.wait(10)
        response_id = next(iter(server.product.responses.running))
        assert alice.post(f"/responses/{response_id}/cancel").json()["status"] == "cancelled"
        thread.join(10)
    rows = _rows(server, "user_alice", count=2)
    assert rows[1].status == "cancelled" and rows[1].endpoint == "responses"
    state = _quota(server, "user_alice")
    assert state.reserved == 0 and state.used == sum(r.total_tokens for r in rows)


def test_tokens_generated_after_the_client_left_are_metered(product_server):
    """A client that leaves mid-stream is billed for every token the engine generated
    for it, those it never received (made before the abort stopped the engine) included:
    on chat completions, completions and responses alike. The stored response keeps the
    output the client saw, and its usage counts all."""
    engine = FakeEngine(reply="abcdefghijklmnopqrstuvwxyz", ahead=5)
    engine.hold.clear()  # generation pauses after the first token
    server = product_server(engine)
    key = _account(server, "alice", token_quota=10_000, quota_period="total")
    bodies = {
        "chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 26},
        "completions": {"prompt": "x", "max_tokens": 26},
        "responses": {"input": "x"},
    }
    response_id = None
    for count, (path, body) in enumerate(bodies.items(), start=1):
        with httpx.stream(
            "POST",
            f"{server.url}/v1/{path}",
            timeout=10,
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "stream": True, **body},
        ) as stream:
            for event in events(stream):
                if event.get("type") == "response.created":
                    response_id = event["response"]["id"]
                if '"a"' in json.dumps([event.get("delta"), event.get("choices")]):
                    break  # the first token reached the client, which leaves
        row = _rows(server, "user_alice", count=count)[-1]
        assert (row.status, row.output_tokens) == ("incomplete", 1 + 5), path
    response = server.product.store.repo.get_response("user_alice", response_id)
    assert response["usage"]["output_tokens"] == 6
    assert response["output"][0]["content"][0]["text"] == "a"
    state = _quota(server, "user_alice")
    rows = _rows(server, "user_alice")
    assert state.reserved == 0 and state.used == sum(r.total_tokens for r in rows)


def test_a_prompt_cache_hit_is_metered_after_the_client_left(product_server):
    """A request whose client leaves mid-stream is billed its prompt's prefix-cache hit
    (which only a finished output would report otherwise) as cached input, on chat
    completions, completions and responses alike, and a stored response's usage says so."""
    engine = FakeEngine(reply="abcdefghijklmnopqrstuvwxyz")
    server = product_server(engine)
    key = _account(server, "alice", token_quota=10_000, quota_period="total")
    text = "the same long prompt"
    bodies = {
        "chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 26},
        "completions": {"prompt": text, "max_tokens": 26},
        "responses": {"input": text},
    }
    for count, (path, body) in enumerate(bodies.items(), start=1):
        engine.hold.set()  # the first request runs to its end, and its prompt is cached
        url, auth = f"{server.url}/v1/{path}", {"Authorization": f"Bearer {key}"}
        primed = httpx.post(url, timeout=10, headers=auth, json={"model": MODEL, **body})
        assert primed.status_code == 200, primed.text
        engine.hold.clear()  # the second pauses after its first token, and its client leaves
        with httpx.stream(
            "POST", url, timeout=10, headers=auth, json={"model": MODEL, "stream": True, **body}
        ) as stream:
            for event in events(stream):
                if event.get("type") == "response.created":
                    response_id = event["response"]["id"]
                if '"a"' in json.dumps([event.get("delta"), event.get("choices")]):
                    break
        row = _rows(server, "user_alice", count=2 * count)[-1]
        assert row.status == "incomplete", path
        assert row.cached_input_tokens == engine.cache_hits[-1] > 0, path
    response = server.product.store.repo.get_response("user_alice", response_id)
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == engine.cache_hits[-1]


def test_the_admin_cli_manages_users_and_keys_the_server_accepts(product_server, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    server = product_server(database_url=f"sqlite:///{data / 'tokenmill.db'}")
    run = ["--data-dir", str(data)]
    assert (
        admin(
            [
                *run,
                "users",
                "create",
                "carol",
                "--token-quota",
                "500",
                "--quota-period",
                "day",
                "--rpm",
                "30",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["token_quota"] == 500
    assert admin([*run, "users", "create", "carol"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert admin([*run, "keys", "create", "carol"]) == 0
    issued = json.loads(capsys.readouterr().out)
    with _client(server, issued["key"]) as carol:
        assert carol.post("/conversations", json={}).status_code == 200
        assert _chat(carol, max_tokens=3).headers["x-ratelimit-limit-requests"] == "30"
        assert admin([*run, "users", "update", "carol", "--rpm", "none"]) == 0
        assert "x-ratelimit-limit-requests" not in _chat(carol, max_tokens=3).headers
        assert admin([*run, "usage", "--user", "carol", "--json"]) == 0
        capsys.readouterr()
        assert admin([*run, "keys", "list", "carol"]) == 0
        assert issued["key"] not in capsys.readouterr().out  # only a hint is shown
        assert admin([*run, "keys", "revoke", issued["id"]]) == 0
        assert json.loads(capsys.readouterr().out) == {"revoked": issued["id"]}
        assert _chat(carol).status_code == 401
    assert admin([*run, "usage", "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["data"]
    assert usage[0]["user"] == "carol" and usage[0]["requests"] == 2
    # a day without its zeros would compare as text past every real day: refused
    assert admin([*run, "usage", "--since", "2026-9-1", "--json"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's error for a value out of range
        admin([*run, "users", "update", "carol", "--token-quota", str(2**64)])
    assert refused.value.code == 2
    assert "must be a whole number from 0 to" in capsys.readouterr().err
    for mib in (str(2**63 >> 20), str(2**64), "-1"):  # bytes past the 64-bit column, or not
        with pytest.raises(SystemExit):
            admin([*run, "users", "update", "carol", "--storage-quota-mb", mib])
        assert f"from 0 to {(2**63 - 1) >> 20} (or" in capsys.readouterr().err
    for option, value in (("--token-quota", "abc"), ("--rpm", "1.5")):  # not integers
        with pytest.raises(SystemExit):
            admin([*run, "users", "update", "carol", option, value])
        err = capsys.readouterr().err
        assert "must be" in err and "_count" not in err and "_positive" not in err
    assert admin([*run, "users", "delete", "carol"]) == 0
    capsys.readouterr()
    mistyped = tmp_path / "dta"  # no store is made where there was none
    assert admin(["--data-dir", str(mistyped), "users", "list"]) == 1
    assert "no data directory" in capsys.readouterr().err and not mistyped.exists()
    repo = server.product.store.repo
    assert db.get_user(repo, "carol") is None
    with server.product.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM conversations").scalar() == 0


def test_the_admin_cli_tables_show_an_unset_value_as_a_dash(tmp_path, capsys):
    run = ["--data-dir", str(tmp_path)]
    assert admin([*run, "users", "create", "erin", "--rpm", "5"]) == 0
    assert admin([*run, "keys", "create", "erin"]) == 0
    capsys.readouterr()
    for command in (["users", "list"], ["keys", "list", "erin"]):
        assert admin([*run, *command]) == 0
        row = capsys.readouterr().out.splitlines()[1].split()
        assert "None" not in row and "-" in row  # no token quota, tpm, storage; not revoked


def test_the_admin_cli_issues_keys_that_expire_and_lists_their_expiry(tmp_path, capsys):
    run = ["--data-dir", str(tmp_path)]
    assert admin([*run, "users", "create", "fay"]) == 0
    capsys.readouterr()
    before = int(time.time())
    assert admin([*run, "keys", "create", "fay", "--expires-in", "30d"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert before + 30 * 86400 <= issued["expires_at"] <= time.time() + 30 * 86400
    expiries = [issued["expires_at"]]
    for when, at in (
        ("2999-01-31", datetime(2999, 1, 31, tzinfo=UTC)),  # a date: its first second, UTC
        ("2999-01-31T18:00:00.5+01:00", datetime(2999, 1, 31, 17, 0, 1, tzinfo=UTC)),
    ):
        assert admin([*run, "keys", "create", "fay", "--expires-at", when]) == 0
        expiries.append(json.loads(capsys.readouterr().out)["expires_at"])
        assert expiries[-1] == at.timestamp()
    assert admin([*run, "keys", "create", "fay"]) == 0
    assert json.loads(capsys.readouterr().out)["expires_at"] is None
    assert admin([*run, "keys", "create", "fay", "--expires-at", "2001-01-01"]) == 1
    assert "not in the future" in capsys.readouterr().err
    for option, value in (
        *(("--expires-in", v) for v in ("30", "0d", "1.5d", "-1d", "30y", "²d", f"{2**63}w")),
        ("--expires-at", "31/01/2999"),
    ):
        with pytest.raises(SystemExit) as refused:
            admin([*run, "keys", "create", "fay", f"{option}={value}"])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert "must be" in err and "_duration" not in err and "_instant" not in err
    with pytest.raises(SystemExit):  # one expiry or the other
        admin([*run, "keys", "create", "fay", "--expires-in", "1d", "--expires-at", "2999-01-01"])
    capsys.readouterr()
    assert admin([*run, "keys", "list", "fay"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["id", "key", "created_at", "expires_at", "revoked_at"]
    # keys made in one second list in the order of their random ids
    assert sorted(row.split()[3] for row in rows) == sorted([*map(str, expiries), "-"])


def test_the_admin_cli_answers_a_database_failure_with_a_message_not_a_traceback(
    tmp_path, capsys, monkeypatch
):
    """A store that fails during a command (SQLite locked by a server's write for longer
    than its busy timeout, a PostgreSQL connection lost) ends the CLI with one line
    saying so and status 1, as a store it cannot open does."""
    run = ["--data-dir", str(tmp_path)]
    assert admin([*run, "users", "create", "gil"]) == 0
    capsys.readouterr()

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO users ...", {}, Exception("database is locked"))

    for name in ("create_user", "add_key", "list_users"):
        monkeypatch.setattr(db, name, locked)
    for command in (["users", "create", "hal"], ["keys", "create", "gil"], ["users", "list"]):
        assert admin([*run, *command]) == 1, command
        out, err = capsys.readouterr()
        assert (out, err) == ("", "error: the store failed: database is locked\n"), command


def test_the_admin_cli_exits_quietly_when_its_reader_stops(tmp_path):
    """`usage --json | head`: a closed pipe ends the CLI as SIGPIPE ends a Unix tool."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the CLI writes
    try:
        cli = [sys.executable, "-m", "orchestrator.admin", "--data-dir", str(tmp_path)]
        done = subprocess.run(
            [*cli, "users", "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_users_requests_beyond_their_share_wait_while_another_user_goes_first(product_server):
    engine = FakeEngine(reply="x" * 40, token_delay=0.02)  # about 0.8 s a request
    server = product_server(engine, max_sequences_per_user=1)
    a_key, b_key = _account(server, "a"), _account(server, "b")

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    with _client(server, a_key) as a, _client(server, b_key) as b, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_chat, a)
        wait_until(lambda: len(engine.running) == 1)
        second = pool.submit(_chat, a)
        time.sleep(0.1)
        assert len(engine.running) == 1 and not second.done()  # it waits in the server
        assert _chat(b).status_code == 200
        assert not second.done()  # b went ahead of it
        assert first.result().status_code == 200 and second.result().status_code == 200
    rows = _rows(server, count=3)
    [b_row] = [r for r in rows if r.user_id == "user_b"]
    assert b_row.queue_time < 0.5
    assert max(r.queue_time for r in rows if r.user_id == "user_a") > 0.5  # after the first


def _until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_request_whose_client_leaves_while_it_waits_for_its_share_never_runs(product_server):
    """A client that gives up on a request queued behind its user's share (an SDK's
    timeout, which it then retries) leaves the queue: the request never reaches the
    engine, is charged nothing and writes no usage row, on every generation route."""
    engine = FakeEngine(reply="x" * 40)
    engine.hold.clear()  # the first request holds the user's one sequence
    server = product_server(engine, max_sequences_per_user=1)
    waiting = server.app.state.tokenmill.admission.waiting
    key = _account(server, "a", token_quota=100_000, quota_period="total")
    gone = {
        "chat/completions": {"messages": [{"role": "user", "content": "gone"}], "max_tokens": 5},
        "completions": {"prompt": "gone", "max_tokens": 5},
        "responses": {"input": "gone", "max_output_tokens": 5},
    }
    host, port = server.url.removeprefix("http://").split(":")
    with _client(server, key) as a, ThreadPoolExecutor(1) as pool:
        first = pool.submit(_chat, a)
        _until(lambda: len(engine.running) == 1)
        for path, body in gone.items():
            for stream in (False, True):
                payload = json.dumps({"model": MODEL, "stream": stream, **body}).encode()
                head = (
                    f"POST /v1/{path} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n"
                )
                with socket.create_connection((host, int(port))) as client:
                    client.sendall(head.encode() + payload)
                    _until(lambda: waiting)  # queued behind the first; its client leaves
                _until(lambda: not waiting)  # the server saw it leave
        engine.hold.set()
        assert first.result().status_code == 200
        assert _chat(a).status_code == 200  # the next request finds the share free
    assert len(engine.prompts) == 2
    rows = _rows(server, "user_a")
    assert [r.status for r in rows] == ["completed", "completed"]
    assert _quota(server, "user_a") == db.QuotaState(sum(r.total_tokens for r in rows), 0)


# A turn of two model generations with the FakeEngine's scripted calculator call.
TOOL_TURN = {
    "model": MODEL,
    "input": "6 times 7?",
    "tools": [CALCULATOR],
    "max_output_tokens": 200,
}


def test_each_model_turn_of_a_tool_loop_reserves_before_it_runs(product_server):
    script = _scripted(_call("calculator", expression="6 * 7"))
    server = product_server(FakeEngine(reply=script))
    rich = _account(server, "rich", token_quota=100_000, quota_period="month")
    with _client(server, rich) as client:
        done = client.post(
            "/responses",
            json=TOOL_TURN,
        ).json()
    assert done["status"] == "completed" and len(server.engine.prompts) == 2
    first_prompt = len(server.engine.prompts[0])
    state = db.quota_state(
        server.product.store.repo, "user_rich", period_start("month", time.time())
    )
    assert state.reserved == 0 and state.used == done["usage"]["total_tokens"]
    # A quota that holds the first model turn (prompt + 200) but not the second too.
    poor = _account(server, "poor", token_quota=first_prompt + 200 + 50, quota_period="month")
    with _client(server, poor) as client:
        cut = client.post(
            "/responses",
            json=TOOL_TURN,
        ).json()
    # OpenAI's codes for a response's error have no insufficient_quota: the closest one,
    # with the cause's own code in the message
    assert cut["status"] == "failed" and cut["error"]["code"] == "rate_limit_exceeded"
    ResponseError.model_validate(cut["error"])
    assert cut["error"]["message"].startswith("insufficient_quota: You exceeded your")
    # what the second turn could have had: the quota less what the first turn used
    left = first_prompt + 200 + 50 - cut["usage"]["total_tokens"]
    assert f"more than the {left} left of your" in cut["error"]["message"]
    assert [item["type"] for item in cut["output"]] == ["function_call", "function_call_output"]
    state = db.quota_state(
        server.product.store.repo, "user_poor", period_start("month", time.time())
    )
    assert state.reserved == 0 and state.used == cut["usage"]["total_tokens"]
    [row] = _rows(server, "user_poor", count=1)
    assert row.status == "failed" and row.total_tokens == cut["usage"]["total_tokens"]
    # The second model turn's reservation keeps of the first's only what it used: a quota
    # of both prompts + the output budget (the most the turn can use) holds the turn.
    second_prompt = len(server.engine.prompts[1])
    exact = _account(
        server, "exact", token_quota=first_prompt + second_prompt + 200, quota_period="month"
    )
    with _client(server, exact) as client:
        fits = client.post(
            "/responses",
            json=TOOL_TURN,
        ).json()
    assert fits["status"] == "completed", fits.get("error")


def test_a_tool_loop_admitted_under_tpm_is_not_cut_by_it(product_server):
    """The tpm limit admits requests: a turn let in runs its later model turns even past
    it, and the next request waits for what they spent."""
    script = _scripted(_call("calculator", expression="6 * 7"))
    server = product_server(FakeEngine(reply=script))
    with _client(server, _account(server, "probe")) as client:
        client.post("/responses", json=TOOL_TURN)
    first_prompt = len(server.engine.prompts[0])
    # room for the first model turn (prompt + 200), not for the two
    key = _account(server, "steady", tpm=first_prompt + 200 + 10)
    with _client(server, key) as client:
        done = client.post("/responses", json=TOOL_TURN).json()
        assert done["status"] == "completed", done.get("error")
        assert done["usage"]["total_tokens"] > first_prompt + 200 + 10
        again = client.post("/responses", json=TOOL_TURN)
    assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"
    assert float(again.headers["retry-after"]) > 0


def test_another_users_conversation_is_not_found_even_while_its_turn_runs(product_server):
    """The one-turn-at-a-time lock is the owner's: a user naming another's conversation
    gets the 404 of an unknown one, never `conversation_locked` (which would tell that it
    exists and is in use), and holds nothing the owner could be refused by."""
    engine = FakeEngine(reply=REPLY)
    engine.hold.clear()  # generation pauses after the first token
    server = product_server(engine)
    alice, bob = _account(server, "alice"), _account(server, "bob")
    with _client(server, alice) as a, _client(server, bob) as b:
        conv = a.post("/conversations", json={}).json()["id"]
        body = {"model": MODEL, "input": "x", "conversation": conv}
        alices_turn = _client(server, alice)
        turn = ThreadPoolExecutor(1).submit(lambda: alices_turn.post("/responses", json=body))
        _wait_for_generation(engine)
        for _ in range(3):
            raw = b.post("/responses", json=body)
            assert raw.status_code == 404 and raw.json()["error"]["code"] == "not_found"
        engine.hold.set()
        assert turn.result(10).status_code == 200
        assert a.post("/responses", json=body).status_code == 200


def test_embeddings_are_metered_and_count_against_the_quota(product_server, tmp_path):
    """A usage row per request (the inputs' tokens), charged to the quota like generation's;
    a request over what is left is refused before anything is embedded."""
    embedder = Embedder.load()
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    key = _account(server, "alice", token_quota=40)
    with _client(server, key) as client:
        first = client.post("/embeddings", json={"model": embedder.name, "input": ["hello world"]})
        assert first.status_code == 200, first.text
        tokens = first.json()["usage"]["prompt_tokens"]
        [row] = _rows(server, "user_alice", count=1)
        assert (row.endpoint, row.model, row.input_tokens) == ("embeddings", embedder.name, tokens)
        assert (row.output_tokens, row.status) == (0, "completed")
        big = client.post("/embeddings", json={"model": embedder.name, "input": "word " * 60})
        assert big.status_code == 429 and big.json()["error"]["code"] == "insufficient_quota"
        assert "(its inputs)" in big.json()["error"]["message"]
    assert [r.status for r in _rows(server, "user_alice")] == ["completed"]
    embedder.close()


def _requests_counted(server: ProductServer, endpoint: str, status: str) -> float:
    """/metrics' count of `endpoint`'s requests that ended `status`."""
    metric = f'tokenmill:endpoint_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(metric):
            return float(line.removeprefix(metric))
    return 0.0


def _ended_early(server: ProductServer) -> float:
    return sum(_requests_counted(server, "embeddings", s) for s in ("rejected", "incomplete"))


def test_an_embeddings_client_that_leaves_is_charged_what_the_embedder_computed(
    product_server, tmp_path
):
    """A client that leaves /v1/embeddings while its work waits behind another job on the
    embedder's one thread (its texts' tokenizing, or its batch of token ids) never had
    anything computed: no usage row, nothing charged, as a generation request that leaves
    before the engine takes it. One that leaves while its batch runs is charged that batch
    (the embedder finishes it), `incomplete`, as a generation that leaves mid-way."""
    embedder = Embedder.load()
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    key = _account(server, "alice", token_quota=100_000, quota_period="total")
    host, port = server.url.removeprefix("http://").split(":")

    def leave_once(body: dict, queued_or_running) -> None:
        payload = json.dumps({"model": embedder.name, **body}).encode()
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        ended = _ended_early(server)
        with socket.create_connection((host, int(port))) as client:
            client.sendall(head.encode() + payload)
            _until(queued_or_running)
        _until(lambda: _ended_early(server) > ended)  # the server saw it leave

    started, release = threading.Event(), threading.Event()
    busy = embedder.jobs.submit(lambda: started.set() or release.wait(30))
    assert started.wait(30)  # the embedder's one thread is taken
    try:
        for body in ({"input": ["hello world"] * 3}, {"input": [[7592, 2088]] * 3}):
            queued = len(embedder.jobs._interactive)  # a dropped job stays there till popped
            leave_once(body, lambda n=queued: len(embedder.jobs._interactive) > n)
    finally:
        release.set()
    busy.result(10)
    assert _rows(server, "user_alice") == []
    assert _quota(server, "user_alice") == db.QuotaState(0, 0)
    assert _requests_counted(server, "embeddings", "rejected") == 2

    running, release = threading.Event(), threading.Event()

    def held_encode(ids, **options):  # its result goes to nobody: no model is built for it
        running.set()
        release.wait(30)
        return Encoded(np.zeros((len(ids), embedder.dimensions), np.float32), [2] * len(ids))

    embedder.encode_ids = held_encode
    try:
        leave_once({"input": [[7592, 2088]] * 3}, running.is_set)
    finally:
        release.set()
    [row] = _rows(server, "user_alice", count=1)
    assert (row.status, row.input_tokens, row.output_tokens) == ("incomplete", 6, 0)
    assert _quota(server, "user_alice") == db.QuotaState(6, 0)
    embedder.close()


def _indexed(client: httpx.Client, store_id: str, file_id: str) -> dict:
    """The vector store file once its ingestion ended."""
    deadline = time.monotonic() + 60
    while True:
        entry = client.get(f"/vector_stores/{store_id}/files/{file_id}").json()
        if entry["status"] != "in_progress" or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def test_vector_store_embeddings_are_metered_and_count_against_the_quota(product_server, tmp_path):
    """A file's chunks and a search's queries are embedded for the owner: each a usage row
    of embedding input, charged to the quota; past it a search is a 429 and a file
    fails with a last_error saying so, nothing embedded."""
    embedder = Embedder.load()
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    key = _account(server, "ida", token_quota=1000)
    text = b"Cats sleep on warm carpets all afternoon while the dogs guard the door."
    with _client(server, key) as ida:
        file_id = ida.post(
            "/files", files={"file": ("a.txt", text)}, data={"purpose": "assistants"}
        )
        file_id = file_id.json()["id"]
        store_id = ida.post("/vector_stores", json={"file_ids": [file_id]}).json()["id"]
        assert _indexed(ida, store_id, file_id)["status"] == "completed"
        found = ida.post(f"/vector_stores/{store_id}/search", json={"query": "where do cats sleep"})
        assert found.status_code == 200 and found.json()["data"]
        rows = _rows(server, "user_ida", count=2)
        assert [(r.endpoint, r.model, r.status, r.output_tokens) for r in rows] == [
            ("vector_stores.files", embedder.name, "completed", 0),
            ("vector_stores.search", embedder.name, "completed", 0),
        ]
        assert [r.input_tokens for r in rows] == [
            len(embedder.tokenize([t])[0])
            for t in (
                text.decode(),
                "where do cats sleep",
            )
        ]
        spent = sum(r.input_tokens for r in rows)
        assert ida.get("/usage").json()["quota"]["used"] == spent
        metrics = httpx.get(f"{server.url}/metrics").text
        for endpoint in ("vector_stores.files", "vector_stores.search"):
            counted = f'requests_total{{endpoint="{endpoint}",status="completed"}} 1.0'
            assert counted in metrics
        db.update_user(server.product.store.repo, "ida", {"token_quota": spent + 2})
        refused = ida.post(f"/vector_stores/{store_id}/search", json={"query": "cats and dogs"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert refused.json()["error"]["type"] == "insufficient_quota"
        other = ida.post("/files", files={"file": ("b.txt", text)}, data={"purpose": "assistants"})
        other = other.json()["id"]
        ida.post(f"/vector_stores/{store_id}/files", json={"file_id": other})
        failed = _indexed(ida, store_id, other)
        assert failed["status"] == "failed" and failed["last_error"]["code"] == "server_error"
        assert failed["last_error"]["message"].startswith("insufficient_quota: You exceeded")
        quota = ida.get("/usage").json()["quota"]
        assert (quota["used"], quota["reserved"]) == (spent, 0)
    assert len(_rows(server, "user_ida")) == 2  # the refusals cost nothing
    embedder.close()


def test_a_file_search_past_the_quota_fails_the_response(product_server, tmp_path):
    """A search's query embeddings the quota refuses end the response as a model turn's
    refusal does (failed, rate_limit_exceeded), not as a tool error the model reads."""
    embedder = Embedder.load()
    server = product_server(data_dir=tmp_path / "data", embedder=embedder)
    key = _account(server, "ivo", token_quota=100_000)
    with _client(server, key) as ivo:
        upload = {"file": ("a.txt", b"Cats sleep on warm carpets.")}
        file_id = ivo.post("/files", files=upload, data={"purpose": "assistants"}).json()["id"]
        store_id = ivo.post("/vector_stores", json={"file_ids": [file_id]}).json()["id"]
        assert _indexed(ivo, store_id, file_id)["status"] == "completed"
        body = {
            "model": MODEL,
            "input": "where do cats sleep",
            "tools": [{"type": "file_search", "vector_store_ids": [store_id]}],
            "tool_choice": "required",  # file_search the only tool: searched before the model
        }
        prompt = ivo.post("/responses/input_tokens", json=body).json()["input_tokens"]
        used = ivo.get("/usage").json()["quota"]["used"]
        # Room for the first generation's reservation, none for the search's query.
        quota = used + prompt + 16
        db.update_user(server.product.store.repo, "ivo", {"token_quota": quota})
        failed = ivo.post("/responses", json={**body, "max_output_tokens": 16}).json()
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "rate_limit_exceeded"
    assert failed["error"]["message"].startswith("insufficient_quota: ")
    assert server.engine.prompts == []  # the model never ran
    embedder.close()


def test_a_storage_quota_set_by_the_admin_cli_refuses_uploads_past_it(
    product_server, tmp_path, capsys
):
    """`--storage-quota-mb 1`: uploads fit until the user's files would pass 1 MiB; the
    next is a 400 the SDK raises as BadRequestError (not a 429 it would retry); deleting a
    file makes room; /v1/usage reports the bytes; 'none' lifts the limit."""
    data = tmp_path / "data"
    data.mkdir()
    server = product_server(database_url=f"sqlite:///{data / 'tokenmill.db'}", data_dir=data)
    run = ["--data-dir", str(data)]
    assert admin([*run, "users", "create", "dora", "--storage-quota-mb", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["storage_quota_bytes"] == 2**20
    assert admin([*run, "keys", "create", "dora"]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    chunk = b"a" * 600_000
    first = sdk.files.create(file=("a.txt", io.BytesIO(chunk)), purpose="assistants")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("b.txt", io.BytesIO(chunk)), purpose="assistants")
    error = refused.value.body
    assert (error["code"], error["param"]) == ("storage_quota_exceeded", "file")
    assert "600000 of your 1048576 bytes" in error["message"]
    assert [f.id for f in sdk.files.list()] == [first.id]
    with _client(server, key) as dora:
        storage = dora.get("/usage").json()["storage"]
    assert storage == {"limit_bytes": 2**20, "used_bytes": 600_000}
    sdk.files.delete(first.id)
    second = sdk.files.create(file=("b.txt", io.BytesIO(chunk)), purpose="assistants")
    assert admin([*run, "users", "update", "dora", "--storage-quota-mb", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["storage_quota_bytes"] is None
    third = sdk.files.create(file=("c.txt", io.BytesIO(chunk)), purpose="assistants")
    assert {f.id for f in sdk.files.list()} == {second.id, third.id}


def test_an_upload_without_a_length_is_refused_once_past_the_limit(product_server, tmp_path):
    """A chunked upload (no Content-Length) over `--max-upload-mb` is a 413 as soon as the
    body passes the limit: the app stops reading it there, rather than spooling the whole
    body, however large, to a temporary file on disk before the size check."""
    server = product_server(data_dir=tmp_path / "data", max_upload_bytes=1024)
    chunk, chunks = b"x" * 65536, 64
    read = 0

    async def body():
        nonlocal read
        yield b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        yield b'--BB\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        for _ in range(chunks):
            read += 1
            yield chunk
        yield b"\r\n--BB--\r\n"

    async def upload() -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            headers = {"content-type": "multipart/form-data; boundary=BB"}
            return await client.post("/v1/files", content=body(), headers=headers)

    answer = asyncio.run(upload())
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "file_too_large"
    assert read <= 2  # the limit and the multipart allowance (64 KiB) end in the second
    assert server.client.files.list().data == []


def test_file_names_that_cannot_be_stored_or_shown_faithfully_are_refused(
    product_server, database_url, tmp_path
):
    """NUL (which PostgreSQL cannot store), other control characters, bidirectional
    overrides that make a name display as another, names past 255 bytes, and names of
    dots and spaces only (`.` and `..` name directories, not files): a 400 on `file`, and
    nothing stored. Names in any script, quotes, spaces and dots are kept."""
    server = product_server(database_url=database_url, data_dir=tmp_path / "data")

    def upload(name: str) -> httpx.Response:
        # Written by hand: clients escape some control characters (httpx sends NUL as %00).
        body = (
            b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
            b'--BB\r\nContent-Disposition: form-data; name="file"; filename="'
            + name.encode()
            + b'"\r\n\r\ndata\r\n--BB--\r\n'
        )
        headers = {"content-type": "multipart/form-data; boundary=BB"}
        return httpx.post(f"{server.url}/v1/files", content=body, headers=headers, timeout=20)

    refused_names = ["a\x00b.txt", "a\x1bb.txt", "invoice\u202etxt.exe", "x" * 252 + ".txt"]
    # names no file can have: a path's own parts (`.`, `..`), dots and spaces only
    refused_names += [".", "..", "...", " ", " . ", "dir/..", "C:\\dir\\..", "\u3000.."]
    for name in refused_names:
        refused = upload(name)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "file"), name
    assert server.client.files.list().data == []
    for name in [
        "notes \u05e2\u05d1\u05e8\u05d9\u05ea.txt",
        "my final plan.md",
        "x" * 251 + ".txt",
        ".env",
        "v1.2..txt",
    ]:
        kept = upload(name)
        assert kept.status_code == 200 and kept.json()["filename"] == name
    # a path keeps its last part, after a `/` or a `\` (Windows' separator)
    for path in ["dir/a.txt", "C:\\Users\\me\\a.txt"]:
        kept = upload(path)
        assert kept.status_code == 200 and kept.json()["filename"] == "a.txt", path


def test_content_types_that_cannot_be_stored_or_sent_back_are_refused(
    product_server, database_url, tmp_path
):
    """A part's Content-Type is kept and sent back as the content route's header: one with
    a control character (which no header may hold: the answer failed as it was sent) or
    a NUL, one outside ASCII, or one longer than its column (a 500 on PostgreSQL) is a
    400 on `file`, and nothing is stored. What a client declares is kept otherwise."""
    server = product_server(database_url=database_url, data_dir=tmp_path / "data")

    def upload(content_type: bytes) -> httpx.Response:
        body = (
            b'--BB\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
            b'--BB\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
            b"Content-Type: " + content_type + b"\r\n\r\ndata\r\n--BB--\r\n"
        )
        headers = {"content-type": "multipart/form-data; boundary=BB"}
        return httpx.post(f"{server.url}/v1/files", content=body, headers=headers, timeout=20)

    for refused in [b"text/html\x00x", b"text/html\x0bx", b"text/\x7f", b"text/\xff", b"a/" * 65]:
        answer = upload(refused)
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, "file"), refused
    assert server.client.files.list().data == []
    for kept in [b'text/plain; charset="iso-8859-1"', b"application/x-" + b"y" * 112]:
        created = upload(kept)
        assert created.status_code == 200, created.text
        content = server.client.files.content(created.json()["id"])
        assert content.response.headers["content-type"] == kept.decode()
    # One an earlier version kept is sent back as bytes of no declared type.
    with server.product.store.engine.begin() as conn:
        conn.execute(update(files).values(content_type="text/html\x0bx"))
    content = server.client.files.content(created.json()["id"])
    assert content.response.headers["content-type"] == "application/octet-stream"
    assert content.content == b"data"


def test_the_files_list_refuses_a_purpose_no_file_can_have(product_server, tmp_path):
    server = product_server(data_dir=tmp_path / "data")
    server.client.files.create(file=("a.txt", b"data"), purpose="assistants")
    refused = httpx.get(f"{server.url}/v1/files", params={"purpose": "assistant"}, timeout=20)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "purpose")
    assert len(server.client.files.list(purpose="assistants").data) == 1


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_running_generation_checkpoints_its_usage_which_settling_replaces(
    product_server, monkeypatch, path
):
    """Chat and completions write their usage so far as they run (what a crash leaves as
    an `incomplete` row at the next start), and the settlement replaces it with the row."""
    monkeypatch.setattr(meter_module, "CHECKPOINT_S", 0.05)
    server = product_server(FakeEngine(token_delay=0.05))
    key = _account(server, "erin", token_quota=10_000)
    body = {"model": MODEL, "max_tokens": 13, "stream": True}
    body |= (
        {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    )
    with _client(server, key) as client:
        streamed = threading.Thread(target=lambda: client.post(path, json=body).read())
        streamed.start()
        deadline = time.monotonic() + 10
        while not (checkpoints := _usage_checkpoints(server.product.store.repo)):
            assert time.monotonic() < deadline, "no usage checkpoint"
            time.sleep(0.02)
        streamed.join(10)
    [record] = checkpoints
    assert (record["status"], record["user_id"]) == ("incomplete", "user_erin")
    assert record["input_tokens"] == len(server.engine.prompts[-1])
    assert 1 <= record["output_tokens"] < 13
    [row] = _rows(server, "user_erin", count=1)
    assert (row.status, row.output_tokens) == ("completed", 13)
    assert _usage_checkpoints(server.product.store.repo) == []


def test_counting_input_tokens_takes_a_request_from_the_rpm_before_reading_the_body(
    product_server,
):
    """POST /v1/responses/input_tokens generates nothing but builds a prompt: it is one
    request of the user's rpm, taken as it arrives (a user past it gets the 429 before
    the server reads, parses or renders anything), and costs none of the token quota."""
    server = product_server()
    server.product.accounts.limiter.clock = lambda: 0.0  # no refill
    key = _account(server, "uma", rpm=2, token_quota=1, quota_period="day")
    body = {"model": MODEL, "input": "How many tokens is this?"}
    with _client(server, key) as uma:
        counted = uma.post("/responses/input_tokens", json=body)
        assert counted.status_code == 200 and counted.json()["input_tokens"] > 1  # > quota
        assert counted.headers["x-ratelimit-remaining-requests"] == "1"
        malformed = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        assert uma.post("/responses/input_tokens", **malformed).status_code == 400
        refused = uma.post("/responses/input_tokens", **malformed)
        assert refused.status_code == 429, refused.text  # not the body's 400: never read
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert uma.post("/responses/input_tokens", json=body).status_code == 429
        assert _chat(uma).status_code == 429  # the same bucket as generation's
    assert _rows(server) == []  # nothing generated, nothing metered


def test_a_vector_store_search_takes_a_request_from_the_rpm_before_reading_the_body(
    product_server, tmp_path
):
    """A vector-store search is one request of the user's rpm, the bucket generation takes
    from, taken as it arrives: a user past it gets the 429 before the body is read or a
    query embedded."""
    server = product_server(data_dir=tmp_path / "data", embedder=Embedder.load())
    server.product.accounts.limiter.clock = lambda: 0.0  # no refill
    key = _account(server, "vic", rpm=2)
    with _client(server, key) as vic:
        search = f"/vector_stores/{vic.post('/vector_stores', json={}).json()['id']}/search"
        found = vic.post(search, json={"query": "where do cats sleep"})
        assert found.status_code == 200 and found.json()["data"] == []
        assert found.headers["x-ratelimit-remaining-requests"] == "1"
        malformed = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        assert vic.post(search, **malformed).status_code == 400
        refused = vic.post(search, json={"query": "and dogs?"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert _chat(vic).status_code == 429  # the same bucket as generation's
    [row] = _rows(server, "user_vic", count=1)  # the one query embedded
    assert row.endpoint == "vector_stores.search"


# A code_interpreter run that writes a 3,000-byte PNG to its working directory.
PLOT = "open('plot.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + bytes(2992))\nprint('saved')"
SANDBOXED = {"type": "code_interpreter", "container": {"type": "auto"}}


def _run_plot(server: ProductServer, key: str, conversation: str | None = None, **extra) -> dict:
    body = {"model": MODEL, "input": "Plot it", "tools": [SANDBOXED], **extra}
    if conversation is not None:
        body["conversation"] = conversation
    with _client(server, key) as client:
        raw = client.post("/responses", json=body)
    assert raw.status_code == 200, raw.text
    return SDKResponse.model_validate(raw.json()).model_dump(mode="json")


def _storage(server: ProductServer, key: str) -> dict:
    with _client(server, key) as client:
        return client.get("/usage").json()["storage"]


def test_code_interpreter_images_kept_with_a_response_count_in_its_storage_quota(
    product_server, tmp_path
):
    """The images a code_interpreter run writes are kept with the response (and its
    conversation's copy of its items): their bytes count in the owner's storage, as
    uploads do, and an upload that no longer fits beside them is refused; deleting the
    response (and the conversation) gives the room back."""
    engine = FakeEngine(reply=_scripted(_call("code_interpreter", code=PLOT)))
    server = product_server(engine, data_dir=tmp_path / "data")
    key = _account(server, "alice", storage_quota_bytes=10_000)
    with _client(server, key) as client:
        conversation = client.post("/conversations", json={}).json()["id"]
    response = _run_plot(server, key, conversation)
    call = response["output"][0]
    assert call["status"] == "completed"
    [image] = [o for o in call["outputs"] if o["type"] == "image"]
    kept = len(image["url"])  # the data URL as stored, ~4/3 of the file's 3,000 bytes
    assert _storage(server, key) == {"limit_bytes": 10_000, "used_bytes": kept}
    with _client(server, key) as client:
        upload = client.post(
            "/files",
            files={"file": ("a.txt", b"x" * (10_001 - kept))},
            data={"purpose": "assistants"},
        )
        assert upload.status_code == 400 and "storage_quota_exceeded" in upload.text
        assert client.delete(f"/responses/{response['id']}").status_code == 200
        assert _storage(server, key)["used_bytes"] == kept  # the conversation still keeps it
        assert client.delete(f"/conversations/{conversation}").status_code == 200
    assert _storage(server, key)["used_bytes"] == 0


def test_a_code_interpreter_run_whose_images_pass_the_storage_quota_fails_and_keeps_none(
    product_server,
):
    """A run whose images would take the owner past their storage quota fails, its
    output saying why (and what the code printed), and no image of it is kept; in a
    `store: false` response, which keeps nothing, the same run completes."""
    server = product_server(FakeEngine(reply=_scripted(_call("code_interpreter", code=PLOT))))
    key = _account(server, "bob", storage_quota_bytes=1_000)
    response = _run_plot(server, key)
    call = response["output"][0]
    assert call["status"] == "failed"
    [logs] = call["outputs"]
    assert logs["type"] == "logs" and "storage quota" in logs["logs"]
    assert "1000 bytes" in logs["logs"] and "saved" in logs["logs"]
    assert _storage(server, key)["used_bytes"] == 0
    with _client(server, key) as client:
        stored = client.get(f"/responses/{response['id']}").json()
    assert stored["output"][0]["outputs"] == call["outputs"]
    unstored = _run_plot(server, key, store=False)["output"][0]
    assert unstored["status"] == "completed" and unstored["outputs"][1]["type"] == "image"
    assert _storage(server, key)["used_bytes"] == 0


def _given_call(size: int) -> dict:
    """An earlier run's code_interpreter_call as a client gives it back: one image, its
    data URL `size` bytes as stored."""
    url = "data:image/png;base64," + "A" * (size - 22)
    return {
        "type": "code_interpreter_call",
        "id": "ci_earlier",
        "status": "completed",
        "code": "plot()",
        "container_id": "cntr_1",
        "outputs": [{"type": "image", "url": url}],
    }


def test_images_given_back_count_in_the_storage_quota_and_are_refused_past_it(
    product_server, database_url
):
    """Each code_interpreter_call given back (as input, by item_reference, or as a
    conversation's items) is stored as a copy of its own, whose images count in the
    storage quota: a request they would take past it is refused with the upload's 400
    before anything is stored or generated (stream or background too); `store: false`
    and text alone still run; a response's input and its conversation's copy of it are
    one image; requests at once never take more than the quota."""
    server = product_server(database_url=database_url)
    key = _account(server, "alice", storage_quota_bytes=1000)
    hi = {"role": "user", "content": "Go on"}
    with _client(server, key) as client:
        first = client.post("/responses", json={"model": MODEL, "input": [_given_call(600), hi]})
        assert first.status_code == 200, first.text
        first = SDKResponse.model_validate(first.json())
        assert _storage(server, key) == {"limit_bytes": 1000, "used_bytes": 600}
        stored_call = client.get(f"/responses/{first.id}/input_items").json()["data"][-1]
        assert stored_call["type"] == "code_interpreter_call"
        conversation = client.post("/conversations", json={}).json()["id"]
        generated = len(server.engine.prompts)
        reference = {"type": "item_reference", "id": stored_call["id"]}
        refusals = [
            client.post("/responses", json={"model": MODEL, "input": [_given_call(600)]}),
            client.post("/responses", json={"model": MODEL, "input": [reference]}),
            client.post(
                "/responses", json={"model": MODEL, "input": [_given_call(401)], "stream": True}
            ),
            client.post(
                "/responses",
                json={"model": MODEL, "input": [_given_call(401)], "background": True},
            ),
            client.post("/conversations", json={"items": [_given_call(401)]}),
            client.post(f"/conversations/{conversation}/items", json={"items": [_given_call(401)]}),
        ]
        for refused, param in zip(refusals, ["input"] * 4 + ["items"] * 2, strict=True):
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["code"], error["param"]) == ("storage_quota_exceeded", param)
            assert "600 of your 1000 bytes" in error["message"]
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        with sdk, pytest.raises(openai.BadRequestError) as raised:
            sdk.responses.create(model=MODEL, input=[_given_call(401)])
        assert (raised.value.code, raised.value.param) == ("storage_quota_exceeded", "input")
        assert len(server.engine.prompts) == generated  # nothing generated for them
        assert _storage(server, key)["used_bytes"] == 600
        assert client.get(f"/conversations/{conversation}/items").json()["data"] == []
        for fits in (
            {"input": [_given_call(401)], "store": False},  # keeps nothing
            {"input": [hi]},  # text alone adds nothing
        ):
            ok = client.post("/responses", json={"model": MODEL, **fits})
            assert ok.status_code == 200, ok.text
        with server.product.store.engine.connect() as conn:
            kept = conn.execute(select(func.count()).select_from(responses)).scalar()
        assert kept == 2  # the first and the text-only one: no refused request has one
        assert _storage(server, key)["used_bytes"] == 600
        body = {"model": MODEL, "input": [_given_call(200)], "conversation": conversation}
        assert client.post("/responses", json=body).status_code == 200
        [copy] = client.get(f"/conversations/{conversation}/items").json()["data"][-1:]
        assert copy["type"] == "code_interpreter_call"
        assert _storage(server, key)["used_bytes"] == 800  # one image, counted once

    def give_back(_: int) -> int:
        with _client(server, key) as client:
            body = {"model": MODEL, "input": [_given_call(100)]}
            return client.post("/responses", json=body).status_code

    with ThreadPoolExecutor(6) as pool:  # 100 bytes each: 2 fit what is left
        answers = sorted(pool.map(give_back, range(6)))
    assert answers == [200] * 2 + [400] * 4
    assert _storage(server, key)["used_bytes"] == 1000
