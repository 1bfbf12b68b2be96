"""Vector stores: named sets of files, indexed for search.

Adding a file records it `in_progress` and starts its ingestion as a background task:
read the bytes, extract and chunk them (a worker thread), embed the chunks (the
embedder's thread), then write the chunks and the status `completed` in one transaction,
or `failed` with `last_error` saying why (a file already `completed` in the store with
the same chunking is kept as it is: knowledge._put_store_files). Nothing of this runs
on the event loop. A file still `in_progress` when the server starts was cut off by a stop
or crash, and `resume` queues it again, so no file stays in progress forever. On
PostgreSQL, which several servers may share, an ingestion first claims its file
(orchestrator/store/advisory_claims.py), so a resumed file that another live server is
ingesting is left to it.

A file holds its bytes, its text and its chunks in memory from the moment its ingestion
reads it until its chunks are written, so at most `INGEST_SLOTS` files are ingested at
once (`IngestionSlots`); the others wait, holding nothing, however many files a batch adds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from orchestrator.accounts import LOCAL, LOCAL_USER, Accounts, Identity, Meter
from orchestrator.errors import InvalidRequestError, NotFoundError, QuotaExceededError
from orchestrator.files import FileService, missing_file
from orchestrator.ids import new_id
from orchestrator.retrieval.chunking import StaticChunking
from orchestrator.retrieval.embeddings import Embedder, Encoded
from orchestrator.retrieval.extract import ExtractionError, UnsupportedFile, extract_text
from orchestrator.retrieval.filters import Filter
from orchestrator.retrieval.index import Hit, SearchMode, SearchRequest
from orchestrator.retrieval.ingest import prepare_chunks
from orchestrator.slots import IngestionSlots, KeyedSlots
from orchestrator.store import ItemPage, Page, Store
from orchestrator.store import accounts as accounts_db
from orchestrator.store import knowledge as kb
from orchestrator.store.accounts import UsageRecord
from orchestrator.store.advisory_claims import AdvisoryClaims, claim_key

log = logging.getLogger("tokenmill.vector_stores")


@dataclass(frozen=True)
class FileToAdd:
    file_id: str
    chunking: StaticChunking
    attributes: dict
    param: str  # the request's field that named it (`file_ids`, `files[2].file_id`), for errors


@dataclass(frozen=True)
class Search:
    query: str
    filters: Filter | None
    max_num_results: int
    score_threshold: float
    mode: SearchMode
    weights: tuple[float, float] = (1.0, 1.0)  # hybrid's (vector, text) weights


def missing_store(vector_store_id: str) -> NotFoundError:
    return NotFoundError(
        f"No vector store found with id '{vector_store_id}'.",
        param="vector_store_id",
        code="not_found",
    )


def _file_counts(counts: kb.FileCounts) -> dict:
    return {
        "in_progress": counts.in_progress,
        "completed": counts.completed,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
        "total": counts.total,
    }


def expired_store(vector_store_id: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The vector store '{vector_store_id}' has expired (see its expires_after), so it "
        "can no longer be searched or have files added. Its files stay until it is "
        "deleted; an update of expires_after that puts expires_at ahead makes it usable "
        "again.",
        param="vector_store_id",
        code="vector_store_expired",
    )


def _vector_store(body: dict, counts: kb.FileCounts, usage_bytes: int) -> dict:
    """The vector store object: its stored body with what is computed when it is read
    (`expires_at` from its `last_active_at` and `expires_after`, and `expired` once that
    has passed)."""
    days = (body["expires_after"] or {}).get("days")
    expires_at = kb.store_expires_at(body["last_active_at"], days)
    if expires_at is not None and expires_at <= time.time():
        status = "expired"
    else:
        status = "in_progress" if counts.in_progress else "completed"
    return {
        **body,
        "expires_at": expires_at,
        "usage_bytes": usage_bytes,
        "status": status,
        "file_counts": _file_counts(counts),
    }


def missing_batch(batch_id: str) -> NotFoundError:
    return NotFoundError(
        f"No file batch found with id '{batch_id}'.", param="batch_id", code="not_found"
    )


def _file_batch(body: dict, counts: kb.FileCounts, cancelled: bool) -> dict:
    if counts.in_progress:
        status = "in_progress"
    elif cancelled:
        status = "cancelled"
    elif counts.total and counts.failed == counts.total:
        status = "failed"
    else:
        status = "completed"
    return {
        **body,
        "status": status,
        "file_counts": _file_counts(counts),
    }


def _error(code: str, message: str) -> dict:
    return {"code": code, "message": message}


SWEEP_SECONDS = 60.0
T = TypeVar("T")


async def _ended(call: Awaitable[T]) -> tuple[T, bool]:
    """`call`'s result once it has ended, and whether this task was cancelled meanwhile. A
    store call runs on the store's thread: a cancelled wait would cancel it while queued,
    or leave it running unheard of, so a claim could be taken and never let go."""
    future = asyncio.ensure_future(call)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    return future.result(), cancelled


class VectorStoreService:
    def __init__(
        self,
        store: Store,
        files: FileService,
        embedder: Embedder,
        accounts: Accounts | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.embedder = embedder
        self.accounts = accounts  # None: embeddings are not metered
        # Called with each embedding usage row as it is written (the server's /metrics).
        self.usage_listeners: list[Callable[[UsageRecord], None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[tuple[str, str, str], asyncio.Task] = {}  # by (owner, store, file)
        self._claims = AdvisoryClaims()
        self._slots = IngestionSlots()
        # One ingestion of a file of a store at a time: one added again waits for the one it stops.
        self._turns: KeyedSlots[tuple[str, str, str]] = KeyedSlots(1)
        files.on_delete(lambda owner, file_id: self._stop_ingestion(owner, None, [file_id]))

    # -- vector stores -------------------------------------------------------------------

    async def create(
        self,
        owner: str,
        name: str | None,
        metadata: dict,
        files: list[FileToAdd],
        description: str | None = None,
        expires_after: dict | None = None,
    ) -> dict:
        """A new store, active from now; with `expires_after` (`{"anchor":
        "last_active_at", "days": n}`) it expires n days after its last use."""
        now = int(time.time())
        body = {
            "id": new_id("vs"),
            "object": "vector_store",
            "created_at": now,
            "name": name,
            "description": description,
            "metadata": metadata,
            "last_active_at": now,
            "expires_after": expires_after,
        }
        store_files = await self._store_files(owner, body["id"], files)
        await self.store.call(kb.add_vector_store, owner, body, store_files)
        self._start(owner, body["id"], store_files)
        return await self.retrieve(owner, body["id"])

    async def retrieve(self, owner: str, vector_store_id: str) -> dict:
        found = await self.store.call(kb.get_vector_store, owner, vector_store_id)
        if found is None:
            raise missing_store(vector_store_id)
        return _vector_store(*found)

    async def list(self, owner: str, page: Page) -> ItemPage:
        found, counts = await self.store.call(kb.list_vector_stores, owner, page)
        return ItemPage(
            [_vector_store(body, *c) for body, c in zip(found.items, counts, strict=True)],
            found.has_more,
        )

    async def update(self, owner: str, vector_store_id: str, changes: dict) -> dict:
        """Change `name`, `metadata` or `expires_after` (None: the store no longer
        expires); a change of expiry is no use of the store."""
        if not await self.store.call(kb.update_vector_store, owner, vector_store_id, changes):
            raise missing_store(vector_store_id)
        return await self.retrieve(owner, vector_store_id)

    async def delete(self, owner: str, vector_store_id: str) -> dict:
        if not await self.store.call(kb.delete_vector_store, owner, vector_store_id):
            raise missing_store(vector_store_id)
        self._stop_ingestion(owner, vector_store_id)
        return {"id": vector_store_id, "object": "vector_store.deleted", "deleted": True}

    async def use(self, owner: str, vector_store_id: str) -> None:
        """Record a use of the store (a search, file_search, files added): its
        `last_active_at` moves to now (at most once a minute: kb.ACTIVE_EVERY), from which
        it expires. 404 for a store that is not the owner's; a 400 for an expired one,
        which cannot be used (nor made active by trying)."""
        now = int(time.time())
        usable = await self.store.call(kb.mark_vector_store_active, owner, vector_store_id, now)
        if usable is None:
            raise missing_store(vector_store_id)
        if not usable:
            raise expired_store(vector_store_id)

    async def search_stores(
        self, owner: str, vector_store_ids: Sequence[str], searches: Sequence[Search]
    ) -> list[Hit]:
        """Several queries over several of the owner's stores (404 for a store that is not
        theirs, 400 for an expired one; each is `use`d): the queries embedded in one
        batch, each searched, and the hits merged, a chunk found by more than one query
        keeping its best score, best first; at most the largest `max_num_results` of the
        searches."""
        for vector_store_id in vector_store_ids:
            await self.use(owner, vector_store_id)
        if not searches:
            return []
        encoded = await self._embed(owner, "vector_stores.search", [s.query for s in searches])
        best: dict[tuple[str, str, int], Hit] = {}
        for search, vector in zip(searches, encoded.vectors, strict=True):
            request = SearchRequest(
                tuple(vector_store_ids),
                search.query,
                vector,
                search.filters,
                search.max_num_results,
                search.score_threshold,
                search.mode,
                search.weights,
            )
            now = int(self.files.clock())
            for hit in await self.store.call(kb.search, owner, request, now):
                key = (hit.vector_store_id, hit.file_id, hit.chunk_index)
                if key not in best or hit.score > best[key].score:
                    best[key] = hit
        ranked = sorted(best.values(), key=lambda h: (-h.score, h.file_id, h.chunk_index))
        return ranked[: max(s.max_num_results for s in searches)]

    async def _embed(
        self, owner: str, endpoint: str, texts: list[str], background: bool = False
    ) -> Encoded:
        """Embed `texts` as `owner`'s embedding usage: a usage row (as /v1/embeddings
        writes, under `endpoint`), charged to their token quota, which is reserved first:
        QuotaExceededError, with nothing embedded, when it does not hold their tokens. The
        tpm counts them without refusing them (`spent=0`): neither a search nor a file's
        ingestion is a request the rpm counts, and a file's chunks are embedded in the
        background, where a retry is no one's to make. They count as the input batch by
        batch as they go to the embedder (`Embedder.aencode_metered`), so an ingestion or
        search stopped mid-way (file removed, store deleted, client gone: its row
        `cancelled`; none when no batch had run) or failing is charged the batches
        embedded. They are tokenized once:
        the ids the quota is reserved for are the ones embedded. `background` (a file's
        ingestion) lets searches go first on the embedder's thread."""
        meter = Meter(
            self.accounts,
            endpoint,
            await self._identity(owner),
            self.embedder.name,
            listeners=self.usage_listeners,
        )
        try:
            ids = await self.embedder.atokenize(texts, background=background)
            encoded = await self.embedder.aencode_metered(ids, meter, 0, background=background)
        except QuotaExceededError:
            await meter.finish("rejected")
            raise
        except asyncio.CancelledError:
            await meter.finish(meter.stopped_status("cancelled"))
            raise
        except BaseException:
            await meter.finish("failed")
            raise
        await meter.finish("completed")
        return encoded

    async def _identity(self, owner: str) -> Identity:
        """Whose account `owner`'s embeddings are charged to (the local user's: none)."""
        if self.accounts is None or owner == LOCAL_USER:
            return LOCAL
        user = await self.store.call(accounts_db.get_user_by_id, owner)
        return Identity(owner) if user is None else Identity.of(user, None)

    # -- vector store files --------------------------------------------------------------

    async def add_file(self, owner: str, vector_store_id: str, file: FileToAdd) -> dict:
        await self.use(owner, vector_store_id)
        store_files = await self._store_files(owner, vector_store_id, [file])
        held = await self.store.call(kb.add_store_files, owner, vector_store_id, store_files)
        if held is None:
            raise missing_store(vector_store_id)
        self._start(owner, vector_store_id, held)
        return held[0]

    async def update_file(
        self, owner: str, vector_store_id: str, file_id: str, attributes: dict
    ) -> dict:
        """New attributes for a file in the store; its chunks are searched by them at once."""
        body = await self.store.call(
            kb.update_store_file, owner, vector_store_id, file_id, attributes
        )
        if body is None:
            raise await self._missing(owner, vector_store_id, missing_file(file_id))
        return body

    async def _missing(
        self, owner: str, vector_store_id: str, error: NotFoundError
    ) -> NotFoundError:
        """What a lookup inside a store that found nothing reports: the store itself when
        it is the one missing, else `error` (the file or batch)."""
        await self.retrieve(owner, vector_store_id)  # raises missing_store
        return error

    async def retrieve_file(self, owner: str, vector_store_id: str, file_id: str) -> dict:
        body = await self.store.call(kb.get_store_file, owner, vector_store_id, file_id)
        if body is None:
            raise await self._missing(owner, vector_store_id, missing_file(file_id))
        return body

    async def file_content(self, owner: str, vector_store_id: str, file_id: str) -> dict:
        """The text a file in the store was indexed from (OpenAI's page of content parts):
        only once it is indexed, since until then (or after a failure or a cancelled batch)
        search cannot find that text, and showing it would say otherwise."""
        entry = await self.retrieve_file(owner, vector_store_id, file_id)
        if entry["status"] != "completed":
            raise InvalidRequestError(
                f"the file is not indexed in this vector store (its status is "
                f"{entry['status']}), so it has no content here",
                "file_id",
            )
        file, content_type, data = await self.files.content(owner, file_id)
        try:
            text = await extract_text(data, file["filename"], content_type)
        except ExtractionError as exc:
            raise InvalidRequestError(f"the file has no text to show: {exc}", "file_id") from None
        return {
            "object": "vector_store.file_content.page",
            "data": [{"type": "text", "text": text}],
            "has_more": False,
            "next_page": None,
        }

    async def list_files(
        self, owner: str, vector_store_id: str, page: Page, status: str | None
    ) -> ItemPage:
        found = await self.store.call(kb.list_store_files, owner, vector_store_id, page, status)
        if found is None:
            raise missing_store(vector_store_id)
        return found

    async def delete_file(self, owner: str, vector_store_id: str, file_id: str) -> dict:
        """Remove a file (its chunks and vectors) from the store; the file itself stays."""
        if not await self.store.call(kb.delete_store_file, owner, vector_store_id, file_id):
            raise await self._missing(owner, vector_store_id, missing_file(file_id))
        self._stop_ingestion(owner, vector_store_id, [file_id])
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    # -- file batches --------------------------------------------------------------------

    async def create_file_batch(
        self, owner: str, vector_store_id: str, files: list[FileToAdd]
    ) -> dict:
        """Add several files at once; the batch reports their progress together."""
        await self.use(owner, vector_store_id)
        store_files = await self._store_files(owner, vector_store_id, files)
        body = {
            "id": new_id("vsfb"),
            "object": "vector_store.files_batch",
            "created_at": int(time.time()),
            "vector_store_id": vector_store_id,
        }
        held = await self.store.call(kb.add_file_batch, owner, vector_store_id, body, store_files)
        if held is None:
            raise missing_store(vector_store_id)
        self._start(owner, vector_store_id, held)
        return await self.retrieve_file_batch(owner, vector_store_id, body["id"])

    async def retrieve_file_batch(self, owner: str, vector_store_id: str, batch_id: str) -> dict:
        found = await self.store.call(kb.get_file_batch, owner, vector_store_id, batch_id)
        if found is None:
            raise await self._missing(owner, vector_store_id, missing_batch(batch_id))
        return _file_batch(*found)

    async def cancel_file_batch(self, owner: str, vector_store_id: str, batch_id: str) -> dict:
        """Cancel the batch: its files still in progress become `cancelled` and their
        ingestion stops; files already indexed stay."""
        stopped = await self.store.call(kb.cancel_file_batch, owner, vector_store_id, batch_id)
        if stopped is None:
            raise await self._missing(owner, vector_store_id, missing_batch(batch_id))
        self._stop_ingestion(owner, vector_store_id, stopped)
        return await self.retrieve_file_batch(owner, vector_store_id, batch_id)

    async def list_batch_files(
        self, owner: str, vector_store_id: str, batch_id: str, page: Page, status: str | None
    ) -> ItemPage:
        found = await self.store.call(
            kb.list_batch_files, owner, vector_store_id, batch_id, page, status
        )
        if found is None:
            raise await self._missing(owner, vector_store_id, missing_batch(batch_id))
        return found

    # -- ingestion -----------------------------------------------------------------------

    def resume(self) -> int:
        """Queue again every file left in_progress (call once, at start-up); returns how
        many. On a shared PostgreSQL database the claims sort out which ones nobody is
        ingesting, and `sweep` picks up those whose claimant dies later."""
        return self._queue(kb.unfinished_store_files(self.store.repo))

    def start_sweeping(self) -> None:
        """On PostgreSQL: every `SWEEP_SECONDS`, queue the files in_progress that this
        server is not ingesting, so that a file whose claimant died after this server
        started (or was still dying when it started) is not left in progress."""
        self._tasks.add(asyncio.get_running_loop().create_task(self._sweep()))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._queue(await self.store.call(kb.unfinished_store_files))

    def _queue(self, unfinished: list[tuple[str, str, str]]) -> int:
        queued = [key for key in unfinished if key not in self._running]
        for owner, vector_store_id, file_id in queued:
            self._spawn(owner, vector_store_id, file_id)
        return len(queued)

    def cancel(self) -> None:
        """Stop ingestion in flight (at shutdown); such files resume at the next start."""
        for task in self._tasks:
            task.cancel()

    async def stop(self) -> None:
        """`cancel`, then wait for the tasks to unwind (each releases its claim through the
        store), so that the store can close after them, not under them."""
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _store_files(
        self, owner: str, vector_store_id: str, files: list[FileToAdd]
    ) -> list[dict]:
        now = int(time.time())
        bodies = []
        for file in files:
            found = await self.files.retrieve(owner, file.file_id, file.param)
            bodies.append(
                {
                    "id": file.file_id,
                    "object": "vector_store.file",
                    "usage_bytes": found["bytes"],
                    "created_at": now,
                    "vector_store_id": vector_store_id,
                    "status": "in_progress",
                    "last_error": None,
                    "chunking_strategy": file.chunking.to_dict(),
                    "attributes": file.attributes,
                }
            )
        return bodies

    def _stop_ingestion(
        self, owner: str, vector_store_id: str | None, file_ids: Sequence[str] | None = None
    ) -> None:
        """Cancel the ingestions under way or waiting of these files (None: all) of a
        store (None: of every store): their rows are gone or cancelled, and what they
        would write would be refused anyway."""
        for (who, store_id, file_id), task in list(self._running.items()):
            if (
                who == owner
                and vector_store_id in (None, store_id)
                and (file_ids is None or file_id in file_ids)
            ):
                task.cancel()

    def _start(self, owner: str, vector_store_id: str, store_files: list[dict]) -> None:
        """Ingest the files added `in_progress` (not those the store kept as they were)."""
        for body in store_files:
            if body["status"] == "in_progress":
                self._spawn(owner, vector_store_id, body["id"])

    def _spawn(self, owner: str, vector_store_id: str, file_id: str) -> None:
        """Ingest the file; one added again while its ingestion runs stops that one, and
        the new one starts once it has let go of its claim (`_ingest`)."""
        key = (owner, vector_store_id, file_id)
        previous = self._running.get(key)
        if previous is not None:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._ingest(owner, vector_store_id, file_id))
        self._tasks.add(task)
        self._running[key] = task

        def done(finished: asyncio.Task) -> None:
            self._tasks.discard(finished)
            if self._running.get(key) is finished:
                del self._running[key]

        task.add_done_callback(done)

    async def _ingest(self, owner: str, vector_store_id: str, file_id: str) -> None:
        """Ingest the file once the ingestions of it added before this one (stopped by it)
        have ended and a slot is free; the claim is taken in the slot, so a file waiting
        for one is left to any other server sharing the database that gets to it first."""
        async with self._turns.hold((owner, vector_store_id, file_id)), self._slots.hold(owner):
            key = claim_key(owner, vector_store_id, file_id)
            if not await self._claim(key):
                return  # another server sharing this database is ingesting it
            try:
                await self._ingest_claimed(owner, vector_store_id, file_id)
            finally:
                await self._release(key)

    async def _claim(self, key: int) -> bool:
        """Take the file's claim. Cancelled meanwhile, the claim is taken or not all the
        same (`_ended`), and let go before the cancellation goes on."""
        taken, cancelled = await _ended(self.store.call(self._claims.claim, key))
        if cancelled:
            if taken:
                await self._release(key)
            raise asyncio.CancelledError
        return taken

    async def _release(self, key: int) -> None:
        """Let go of the file's claim, to the end even when cancelled meanwhile (a re-add
        stops an ingestion as it finishes): a claim kept would hold the file in progress
        until this server restarts, every later ingestion of it refused."""
        _, cancelled = await _ended(self.store.call(self._claims.release, key))
        if cancelled:
            raise asyncio.CancelledError

    async def _ingest_claimed(self, owner: str, vector_store_id: str, file_id: str) -> None:
        chunks, error, body = None, None, None
        try:
            body = await self.store.call(kb.get_store_file, owner, vector_store_id, file_id)
            if body is None or body["status"] != "in_progress":
                return
            static = body["chunking_strategy"]["static"]
            strategy = StaticChunking(
                static["max_chunk_size_tokens"], static["chunk_overlap_tokens"]
            )
            file, content_type, data = await self.files.content(owner, file_id)
            chunks = await prepare_chunks(
                self.embedder,
                file_id,
                file["filename"],
                data,
                content_type,
                strategy,
                body["attributes"],
                partial(self._embed, owner, "vector_stores.files", background=True),
            )
        except QuotaExceededError as exc:
            error = _error("server_error", f"insufficient_quota: {exc.message}")
        except UnsupportedFile as exc:
            error = _error("unsupported_file", str(exc))
        except ExtractionError as exc:
            error = _error("invalid_file", str(exc))
        except NotFoundError:
            error = _error("invalid_file", f"the file {file_id} was deleted")
        except Exception:
            log.exception("ingesting %s into %s failed", file_id, vector_store_id)
            error = _error("server_error", "the server failed to index this file")
        try:
            await self.store.call(
                kb.finish_store_file, owner, vector_store_id, file_id, chunks, error, body
            )
        except Exception:
            if chunks is None:
                raise  # not even the failure could be written: the sweep tries again
            # The chunks could not be written (not the database's absence: then this
            # write fails too and the sweep takes the file again), so the file fails
            # rather than staying in progress for every later sweep to fail on again.
            log.exception("storing the index of %s in %s failed", file_id, vector_store_id)
            error = _error("server_error", "the server failed to store this file's index")
            await self.store.call(
                kb.finish_store_file, owner, vector_store_id, file_id, None, error, body
            )
