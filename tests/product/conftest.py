"""Fixtures for the product tests: a database of each kind, and the app on a fake engine
with a real store, served by uvicorn in a thread (real sockets, streaming, disconnects)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from starlette.applications import Starlette

from orchestrator import Product
from orchestrator.retrieval.embeddings import Embedder
from server import ServerConfig, build_app
from tests.server.conftest import serve_in_thread
from tests.server.fake_engine import FakeEngine


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
    app: Starlette


@pytest.fixture
def product_server(tmp_path) -> Iterator[Callable[..., ProductServer]]:
    """Factory: product_server(engine=None, database_url=None, data_dir=None, embedder=None)
    -> ProductServer (files need a data_dir, vector stores an embedder too)."""
    stops: list[Callable[[], None]] = []

    def start(
        engine: FakeEngine | None = None,
        database_url: str | None = None,
        data_dir: Path | None = None,
        embedder: Embedder | None = None,
        **config,
    ) -> ProductServer:
        engine = engine or FakeEngine()
        product = Product.open(
            engine, database_url or f"sqlite:///{tmp_path / 'product.db'}", data_dir, embedder
        )
        config.setdefault("served_model_names", ["fake-model"])
        app = build_app(engine, ServerConfig(**config), product, embedder)
        url, stop_server = serve_in_thread(app)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def stop() -> None:
            client.close()
            stop_server()
            product.close()

        stops.append(stop)
        return ProductServer(url, engine, product, client, app)

    yield start
    for stop in stops:
        stop()
