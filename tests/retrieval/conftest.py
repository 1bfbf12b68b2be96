"""Fixtures for the retrieval tests: the embedding model, loaded once per session."""

from __future__ import annotations

import pytest

from orchestrator.retrieval.embeddings import Embedder


@pytest.fixture(scope="session")
def embedder():
    model = Embedder.load()
    yield model
    model.close()
