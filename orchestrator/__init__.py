"""The chat product: conversations and responses on a store, in front of the engine.

`Product.open(engine, database_url)` builds it; the server's routes call its services.
Layers: `store/` (the only SQL), `context` (items -> prompt), `events` (the Responses
event stream and the state it builds), `responses` (the turn's state machine) and
`conversations`. See docs/product.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.conversations import ConversationService
from orchestrator.errors import InvalidRequestError, NotFoundError, ProductError
from orchestrator.responses import FunctionTool, ResponseRequest, ResponseService
from orchestrator.store import Page, Store
from orchestrator.tools import ToolRegistry
from server.engine_client import EngineClient

# Every object belongs to a user; until accounts exist, all requests act as this one.
LOCAL_USER = "user_local"


@dataclass
class Product:
    store: Store
    responses: ResponseService
    conversations: ConversationService

    @classmethod
    def open(cls, engine: EngineClient, database_url: str, tools: ToolRegistry | None = None,
             default_tools: tuple[str, ...] = ()) -> Product:
        """Open (and migrate) the database and build the services on `engine`, with the
        built-in `tools` (this server's `builtin_tools()` by default) and the ones offered
        without being declared (`default_tools`).

        A SQLite file belongs to this server alone, so responses left `in_progress` there
        were cut off by a crash: they are marked `incomplete`. A PostgreSQL database may
        be shared by several servers, whose responses in flight must be left alone."""
        store = Store(database_url)
        if store.engine.dialect.name == "sqlite":
            store.repo.interrupt_unfinished()
        return cls(store, ResponseService(engine, store, tools, default_tools),
                   ConversationService(store))

    def close(self) -> None:
        self.store.close()


__all__ = [
    "LOCAL_USER",
    "ConversationService",
    "FunctionTool",
    "InvalidRequestError",
    "NotFoundError",
    "Page",
    "Product",
    "ProductError",
    "ResponseRequest",
    "ResponseService",
]
