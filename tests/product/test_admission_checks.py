"""A request's own mistakes are answered at once, whatever the load: every check that
needs no generation runs before a request waits for the user's share of the engine, so
a user whose share is taken gets the 400 (or 404) of a malformed request at once, while
their valid requests still wait for a place."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.responses import Response

from tests.product.conftest import ProductServer
from tests.product.test_accounts_api import _account, _client
from tests.product.test_responses_api import _wait_for_generation
from tests.server.fake_engine import FakeEngine

MODEL = "fake-model"
WINDOW = 256  # the fake engine's context window, in tokens (characters)
# An answer within this long did not wait behind the held generation (which waits for
# the test to release it).
AT_ONCE_S = 2.0


@dataclass
class Saturated:
    """A server capping each user at one sequence, whose engine holds generation after
    the first token, and a user whose one place is taken by a running request."""

    server: ProductServer
    client: httpx.Client

    def waiting(self, pool: ThreadPoolExecutor, path: str, body: dict) -> Future:
        """A valid request sent on a thread; it waits for the user's place."""
        waiter = pool.submit(self.client.post, path, json=body)
        time.sleep(0.3)
        assert not waiter.done(), "a valid request should wait for the user's share"
        assert len(self.server.engine.prompts) == 1  # only the running one reached the engine
        return waiter

    def refused(self, path: str, body: dict, status: int, param: str) -> dict:
        """The request's error, answered at once (the user's place still taken)."""
        started = time.monotonic()
        answer = self.client.post(path, json=body, timeout=AT_ONCE_S)
        assert time.monotonic() - started < AT_ONCE_S
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["param"] == param, error
        return error


@pytest.fixture
def saturated(product_server, tmp_path) -> Iterator[Saturated]:
    engine = FakeEngine(reply="abcdef", max_model_len=WINDOW)
    engine.hold.clear()  # generation pauses after the first token
    server = product_server(engine, data_dir=tmp_path / "data", max_sequences_per_user=1)
    with _client(server, _account(server, "ada")) as client:
        running = client.post(
            "/responses", json={"model": MODEL, "input": "first", "background": True}
        )
        assert running.status_code == 200, running.text
        _wait_for_generation(engine)
        yield Saturated(server, client)
        engine.hold.set()


def _finish(saturated: Saturated, waiter: Future) -> dict:
    """Release the held generation: the waiting request runs and succeeds."""
    saturated.server.engine.hold.set()
    answer = waiter.result(timeout=20)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_responses_mistake_is_answered_while_the_users_share_is_taken(saturated):
    valid = {"model": MODEL, "input": "second"}
    with ThreadPoolExecutor(1) as pool:
        waiter = saturated.waiting(pool, "/responses", valid)
        refused = saturated.refused
        unknown = refused(
            "/responses",
            {**valid, "previous_response_id": "resp_unknown"},
            404,
            "previous_response_id",
        )
        assert unknown["code"] == "previous_response_not_found"
        refused(
            "/responses",
            {**valid, "tools": [{"type": "file_search", "vector_store_ids": ["vs_x"]}]},
            400,
            "tools[0]",
        )
        refused(
            "/responses",
            {
                **valid,
                "input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}],
            },
            400,
            "input",
        )
        refused(
            "/responses",
            {
                **valid,
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_file", "file_id": "file-unknown"}],
                    }
                ],
            },
            404,
            "input[0].content[0].file_id",
        )
        refused(  # json_object output asks for a prompt that mentions JSON
            "/responses", {**valid, "text": {"format": {"type": "json_object"}}}, 400, "input"
        )
        refused(
            "/responses",
            {
                **valid,
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "bad",
                        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                    }
                },
            },
            400,
            "text.format.schema",
        )
        too_long = refused("/responses", {**valid, "input": "x" * 2 * WINDOW}, 400, "input")
        assert too_long["code"] == "context_length_exceeded"
        assert not waiter.done()  # the valid request waits on, behind the running one
        done = Response.model_validate(_finish(saturated, waiter))
    assert done.status == "completed"


def test_a_chat_or_completions_mistake_is_answered_while_the_users_share_is_taken(saturated):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    refused = saturated.refused
    with ThreadPoolExecutor(1) as pool:
        waiter = saturated.waiting(pool, "/chat/completions", chat)
        long_chat = {**chat, "messages": [{"role": "user", "content": "x" * 2 * WINDOW}]}
        error = refused("/chat/completions", long_chat, 400, "messages")
        assert error["code"] == "context_length_exceeded"
        error = refused("/chat/completions", {**chat, "max_tokens": WINDOW}, 400, "messages")
        assert error["code"] == "context_length_exceeded"
        completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
        refused("/completions", {**completion, "prompt": [0x110000 + 5]}, 400, "prompt")
        error = refused("/completions", {**completion, "prompt": "x" * 2 * WINDOW}, 400, "prompt")
        assert error["code"] == "context_length_exceeded"
        assert not waiter.done()
        ChatCompletion.model_validate(_finish(saturated, waiter))
        answer = saturated.client.post("/completions", json=completion)
    assert answer.status_code == 200, answer.text
    Completion.model_validate(answer.json())
