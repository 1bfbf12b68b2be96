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

# httpx makes an SSL context for every client (verify=True: its CA bundle loaded, about
# 35 ms of CPU), though these tests speak plain HTTP: their clients share this one.
SSL_CONTEXT = httpx.create_ssl_context()


@dataclass
class RunningServer:
    url: str
    engine: FakeEngine
    app: object
    client: httpx.Client


def serve_in_thread(app: object) -> tuple[str, Callable[..., threading.Thread]]:
    """Serve `app` with uvicorn on a free port in a daemon thread: (its URL, a stop).
    `stop()` returns once the server has stopped; `stop(wait=False)` only tells it to
    (uvicorn notices within its 0.1 s tick and then waits 0.1 s more for connections) and
    returns its thread, to join later."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)

    def stop(wait: bool = True) -> threading.Thread:
        server.should_exit = True
        if wait:
            thread.join(10)
        return thread

    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", stop


@pytest.fixture(scope="session")
def _stopping_servers() -> Iterator[list[threading.Thread]]:
    """The threads of `serve`'s servers told to stop and not yet joined."""
    stopping: list[threading.Thread] = []
    yield stopping
    for thread in stopping:
        thread.join(10)


@pytest.fixture
def serve(_stopping_servers: list[threading.Thread]) -> Iterator[Callable[..., RunningServer]]:
    """Factory: serve(engine=None, **ServerConfig fields) -> RunningServer.

    A test's servers stop while the next tests run: waiting for uvicorn's shutdown (about
    0.2 s of its timers, with no work to do) took most of a test's time here. They are
    joined at the session's end."""
    stops: list[Callable[..., threading.Thread]] = []

    def start(engine: FakeEngine | None = None, **config) -> RunningServer:
        engine = engine or FakeEngine()
        config.setdefault("served_model_names", ["fake-model"])
        app = build_app(engine, ServerConfig(**config))
        url, stop_server = serve_in_thread(app)
        # Generous: a large body or prompt is prepared in the SCHED_IDLE child, which runs
        # only on an idle core, and the other pytest worker's servers may hold both for
        # seconds (a 100 kB body timed out at 10 s once, with the machine busy).
        client = httpx.Client(base_url=url, timeout=60, verify=SSL_CONTEXT)

        def stop() -> threading.Thread:
            client.close()
            return stop_server(wait=False)

        stops.append(stop)
        return RunningServer(url, engine, app, client)

    yield start
    _stopping_servers[:] = [t for t in _stopping_servers if t.is_alive()]
    _stopping_servers.extend(stop() for stop in stops)
