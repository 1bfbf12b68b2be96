"""Fixtures for the product tests: a database of each kind, and the app on a fake engine
with a real store, served by uvicorn in a thread (real sockets, streaming, disconnects)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import openai
import pytest
import uvicorn

from orchestrator import Product
from server import ServerConfig, build_app
from tests.product.postgres import PostgresServer, start_postgres
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database of each kind the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tokenmill.db'}"
    return request.getfixturevalue("postgres").create_database()


@dataclass
class ProductServer:
    url: str
    engine: FakeEngine
    product: Product
    client: openai.OpenAI


@pytest.fixture
def product_server(tmp_path) -> Iterator[Callable[..., ProductServer]]:
    """Factory: product_server(engine=None, database_url=None) -> ProductServer."""
    stops: list[Callable[[], None]] = []

    def start(engine: FakeEngine | None = None, database_url: str | None = None,
              **config) -> ProductServer:
        engine = engine or FakeEngine()
        product = Product.open(engine, database_url or f"sqlite:///{tmp_path / 'product.db'}")
        config.setdefault("served_model_names", ["fake-model"])
        app = build_app(engine, ServerConfig(**config), product)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def stop() -> None:
            client.close()
            server.should_exit = True
            thread.join(10)
            product.close()

        stops.append(stop)
        return ProductServer(url, engine, product, client)

    yield start
    for stop in stops:
        stop()
