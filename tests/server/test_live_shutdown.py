"""SIGTERM: stop accepting, let the stream in flight finish, then exit cleanly."""

from __future__ import annotations

import signal
import time

import httpx
import openai

from tests.server.live_server import start_server


def _refusing(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 503
    except httpx.TransportError:  # the listening socket is closed
        return True


def test_sigterm_drains_in_flight_streams_then_exits():
    server = start_server("--shutdown-timeout", "60", "--compile", "off")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=64, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        received = [next(chunks), next(chunks)]  # role, then the first token
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _refusing(server.url):
            assert time.monotonic() < deadline, "still accepting requests after SIGTERM"
            time.sleep(0.05)
        received += list(chunks)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert received[-1].usage.completion_tokens == 64
    assert received[-2].choices[0].finish_reason == "length"
