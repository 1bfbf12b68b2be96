"""Fixtures for the product tests: a database of each kind, and the app on a fake engine
with a real store, served by uvicorn in a thread (real sockets, streaming, disconnects)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from starlette.applications import Starlette

from orchestrator import Product
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.store import Store
from server import ServerConfig, build_app
from tests.server.conftest import SSL_CONTEXT, serve_in_thread
from tests.server.fake_engine import FakeEngine


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database of each kind the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tokenmill.db'}"
    return request.getfixturevalue("postgres").create_database()


def _migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database at the newest schema, made once per test session (per
    pytest worker): the migrations took 0.2-0.5 s of each server's start, so each server
    starts on a copy, which it finds current. The migrations themselves are tested in
    tests/product/test_store.py."""
    path = tmp_path_factory.getbasetemp() / "product-schema.db"
    if not path.exists():
        Store(f"sqlite:///{path}").close()
        # Closed, the database is checkpointed into its one file: the copy is all of it.
        assert not path.with_name(path.name + "-wal").exists()
    return path


@dataclass
class ProductServer:
    url: str
    engine: FakeEngine
    product: Product
    client: openai.OpenAI
    app: Starlette


@pytest.fixture
def product_server(tmp_path, tmp_path_factory) -> Iterator[Callable[..., ProductServer]]:
    """Factory: product_server(engine=None, database_url=None, data_dir=None, embedder=None)
    -> ProductServer (files need a data_dir, vector stores an embedder too). Without a
    database_url the test's servers store into one SQLite database of its own.

    A server on SQLite stops while the next tests run: waiting for uvicorn's shutdown
    (about 0.2 s of its timers, with no work to do) took a good part of a short test.
    Its product is closed once it has stopped, by a thread that the interpreter joins
    at exit. A server on PostgreSQL stops before the test ends, as the session's
    PostgreSQL may stop before the interpreter exits."""
    stops: list[Callable[[], None]] = []

    def start(
        engine: FakeEngine | None = None,
        database_url: str | None = None,
        data_dir: Path | None = None,
        embedder: Embedder | None = None,
        **config,
    ) -> ProductServer:
        engine = engine or FakeEngine()
        if database_url is None:  # the test's own database, shared by its servers
            database = tmp_path / "product.db"
            if not database.exists():
                shutil.copyfile(_migrated_sqlite(tmp_path_factory), database)
            database_url = f"sqlite:///{database}"
        product = Product.open(engine, database_url, data_dir, embedder)
        config.setdefault("served_model_names", ["fake-model"])
        app = build_app(engine, ServerConfig(**config), product, embedder)
        url, stop_server = serve_in_thread(app)
        client = openai.OpenAI(
            base_url=f"{url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=SSL_CONTEXT),
        )

        def stop() -> None:
            client.close()
            if product.store.engine.dialect.name == "postgresql":
                stop_server()
                product.close()
                return
            server = stop_server(wait=False)
            threading.Thread(target=_close_after, args=(server, product)).start()

        stops.append(stop)
        return ProductServer(url, engine, product, client, app)

    yield start
    for stop in stops:
        stop()


def _close_after(server: threading.Thread, product: Product) -> None:
    server.join(10)
    product.close()
