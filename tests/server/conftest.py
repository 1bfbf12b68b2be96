"""Fixtures for the server tests: the app on a fake engine, served by a real uvicorn
in a background thread, so tests exercise real sockets, streaming and disconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from server import ServerConfig, build_app
from tests.server.fake_engine import FakeEngine


@dataclass
class RunningServer:
    url: str
    engine: FakeEngine
    app: object
    client: httpx.Client


def serve_in_thread(app: object) -> tuple[str, Callable[[], None]]:
    """Serve `app` with uvicorn on a free port in a daemon thread: (its URL, a stop)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", stop


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Factory: serve(engine=None, **ServerConfig fields) -> RunningServer."""
    stops: list[Callable[[], None]] = []

    def start(engine: FakeEngine | None = None, **config) -> RunningServer:
        engine = engine or FakeEngine()
        config.setdefault("served_model_names", ["fake-model"])
        app = build_app(engine, ServerConfig(**config))
        url, stop_server = serve_in_thread(app)
        # Generous: a large body or prompt is prepared in the SCHED_IDLE child, which runs
        # only on an idle core, and the other pytest worker's servers may hold both for
        # seconds (a 100 kB body timed out at 10 s once, with the machine busy).
        client = httpx.Client(base_url=url, timeout=60)

        def stop() -> None:
            client.close()
            stop_server()

        stops.append(stop)
        return RunningServer(url, engine, app, client)

    yield start
    for stop in stops:
        stop()
