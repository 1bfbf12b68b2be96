"""The server process's life: SIGTERM drains (new requests get 503 while streams finish, and
streams past --shutdown-timeout end with an error event) and exits 0; a dead engine loop
turns /health to 503 and exits non-zero, so a supervisor restarts it."""

from __future__ import annotations

import signal
import time

import httpx
import openai

from tests.server.faulty_serve import KILL
from tests.server.live_server import start_server
from tests.server.sse_client import events

MODEL = "smollm2-135m-instruct"
# What these tests need of a server is its process's life, not its speed: without the
# default w8a8 quantization (SmoothQuant calibrated at load) a start takes a quarter of
# the CPU time (4.6 s against 19.5 s, 2-vCPU AMD EPYC). Nor do they use the embedding
# model (/v1/embeddings, vector stores), which is left unloaded.
QUICK_START = ("--quantization", "none", "--compile", "off", "--no-embeddings")


def _stream_body(max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi!"}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def test_sigterm_drains_in_flight_streams_then_exits():
    server = start_server("--shutdown-timeout", "10", *QUICK_START)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        short = iter(
            client.chat.completions.create(
                **{k: v for k, v in _stream_body(8).items() if k != "ignore_eos"},
                extra_body={"ignore_eos": True},
            )
        )
        received = [next(short), next(short)]  # role, then the first token
        with (
            httpx.Client(base_url=server.url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=_stream_body(6000)) as long,
        ):
            long_events = events(long)
            next(long_events)
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            # New connections are still answered, with 503, while the streams run on.
            while httpx.get(f"{server.url}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "still healthy after SIGTERM"
                time.sleep(0.05)
            refused = httpx.post(
                f"{server.url}/v1/chat/completions", json=_stream_body(1), timeout=5
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutting_down"
            received += list(short)
            rest = list(long_events)  # cut after --shutdown-timeout
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert received[-1].usage.completion_tokens == 8
    assert received[-2].choices[0].finish_reason == "length"
    assert rest[-1] == "[DONE]"
    assert rest[-2]["error"]["code"] == "server_shutdown"


def test_a_dead_engine_loop_turns_health_503_and_exits_nonzero():
    server = start_server(*QUICK_START, entry="tests.server.faulty_serve")
    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        r = httpx.post(
            f"{server.url}/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": [KILL]},
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error"
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503
        assert "killed on purpose" in health.json()["error"]
        assert server.process.wait(30) != 0
    finally:
        server.stop()
