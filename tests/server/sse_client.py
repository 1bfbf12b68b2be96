"""Reading Server-Sent Events the way a client does, for the tests."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx


def events(response: httpx.Response) -> Iterator[dict | str]:
    """Each `data:` payload, parsed; the final "[DONE]" as that string."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def stream(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))
