"""`Product`: the chat product assembled on a store, in front of the engine: its services,
their recovery at start, and their shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from engine.client import EngineClient
from orchestrator.accounts import Accounts
from orchestrator.conversation_lock import ConversationLock
from orchestrator.conversations import ConversationService
from orchestrator.files import FileService, import_disk_files
from orchestrator.input_resolver import InputResolver
from orchestrator.responses import ResponseService
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.store import Store, database_error, servers
from orchestrator.store.accounts import release_reservations, settle_checkpoints
from orchestrator.store.knowledge import prepare_index
from orchestrator.tools import ToolRegistry
from orchestrator.vector_stores import VectorStoreService

log = logging.getLogger("tokenmill")


@dataclass
class Product:
    store: Store
    responses: ResponseService
    conversations: ConversationService
    accounts: Accounts
    # With a data directory: uploaded files; with an embedder too: vector stores (on
    # PostgreSQL only when it has pgvector).
    files: FileService | None = None
    vector_stores: VectorStoreService | None = None
    index_unavailable: str | None = None  # why the database cannot hold the index
    # On PostgreSQL, from `resume`: recovering the turns of servers that crash later.
    recovery: asyncio.Task | None = None

    @classmethod
    def open(
        cls,
        engine: EngineClient,
        database_url: str,
        data_dir: Path | None = None,
        embedder: Embedder | None = None,
        tools: ToolRegistry | None = None,
        default_tools: tuple[str, ...] = (),
    ) -> Product:
        """Open (and migrate) the database and build the services on `engine`, with the
        built-in `tools` (this server's `builtin_tools()` by default) and the ones offered
        without being declared (`default_tools`).

        A SQLite file belongs to this server alone, so responses left `in_progress` there
        were cut off by a crash: they are marked `incomplete`, the usage they had
        checkpointed is recorded and charged, and quota reservations left there are
        released. A PostgreSQL database may be shared by several servers: only the rows
        of the servers that are gone get that (`store/servers.py`), now and (from
        `resume`) every `RECOVERY_SECONDS`."""
        store = Store(database_url)
        if store.server_lock is None:
            store.repo.interrupt_unfinished()
            settle_checkpoints(store.repo)
            release_reservations(store.repo)
        else:
            servers.recover_departed(store.repo, store.server_lock)
        lock = ConversationLock(store)
        inputs = InputResolver(store, engine.tokenizer, engine.max_model_len)
        product = cls(
            store,
            ResponseService(engine, store, lock, inputs, tools, default_tools),
            ConversationService(store, lock, inputs),
            Accounts(store),
        )
        if data_dir is not None:
            import_disk_files(store, Path(data_dir).expanduser() / "files")
            product.files = inputs.files = FileService(store)
            if embedder is not None:
                product.index_unavailable = prepare_index(store.repo)
            if embedder is not None and product.index_unavailable is None:
                product.vector_stores = VectorStoreService(
                    store, product.files, embedder, product.accounts
                )
        product.responses.file_search = product.vector_stores
        if product.vector_stores is None:
            product.responses.file_search_unavailable = (
                f"file_search is not available: {product.vector_stores_unavailable()}"
            )
        return product

    def vector_stores_unavailable(self) -> str:
        """Why this product serves no vector stores (for the routes' error)."""
        if self.index_unavailable is not None:
            return (
                f"vector stores and file search are not available on this database: "
                f"{self.index_unavailable}"
            )
        return "vector stores need the embedding model: start the server with --embeddings"

    def resume(self) -> None:
        """Start-up work that needs the event loop: expired files are deleted, now and every
        minute; ingestion cut off by the last stop is queued again (on PostgreSQL, only
        the files no live server has claimed, and again every minute for claimants that
        die later); on PostgreSQL, the turns of servers that crash from now on are
        recovered every `RECOVERY_SECONDS`."""
        if self.files is not None:
            self.files.start_sweeping()
        if self.vector_stores is not None:
            self.vector_stores.resume()
            if self.store.engine.dialect.name == "postgresql":
                self.vector_stores.start_sweeping()
        if self.store.server_lock is not None:
            self.recovery = asyncio.get_running_loop().create_task(self._recover_departed())

    async def _recover_departed(self) -> None:
        while True:
            await asyncio.sleep(servers.RECOVERY_SECONDS)
            try:
                await self.store.call(servers.recover_departed, self.store.server_lock)
            except SQLAlchemyError as exc:  # the database down: try again next time
                log.warning("recovering crashed servers' turns failed: %s", database_error(exc))

    async def stop_background(self) -> None:
        """End the background work (ingestion, the sweep of expired files, responses'
        records being retried, the recovery of crashed servers) while the store is still
        open: before `close` where an event loop runs."""
        await self.responses.stop_recording()
        if self.recovery is not None:
            self.recovery.cancel()
            await asyncio.gather(self.recovery, return_exceptions=True)
        if self.files is not None:
            await self.files.stop()
        if self.vector_stores is not None:
            await self.vector_stores.stop()

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.cancel()
        if self.files is not None:
            self.files.cancel()
        if self.vector_stores is not None:
            self.vector_stores.cancel()
        self.store.close()
