"""Uploaded files: the file objects and their bytes, both in the store.

A file's row and its bytes are written in one transaction, so a file object never names
missing bytes, and every server on a shared database reads the same files. Files an
earlier version kept in `<data dir>/files/<id>` are moved into the store at start
(`import_disk_files`).

A file uploaded with `expires_after` is gone from its `expires_at` on: every read takes
the service's clock and finds it no more, and a sweep every `SWEEP_SECONDS` deletes it
(its bytes, and its place and chunks in every vector store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from orchestrator.errors import NotFoundError
from orchestrator.ids import new_id
from orchestrator.store import ItemPage, Page, Store, database_error
from orchestrator.store import knowledge as kb

log = logging.getLogger("tokenmill")

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

SWEEP_SECONDS = 60.0  # how often expired files are deleted
SWEEP_BATCH = 100  # files deleted per transaction, so that a sweep holds no long lock


@dataclass(frozen=True)
class FileExpiry:
    """OpenAI's `expires_after` of a file: gone `seconds` after its anchor, which can only
    be its `created_at`."""

    seconds: int


def missing_file(file_id: str, param: str = "file_id") -> NotFoundError:
    """`param`: the request's field that named the file."""
    return NotFoundError(f"No such File object: {file_id}", param=param, code="not_found")


def import_disk_files(store: Store, folder: Path) -> int:
    """Move the bytes an earlier version kept in `folder` into the store (a file deleted
    since, or a write a crash cut short, is dropped); returns how many were moved."""
    if not folder.is_dir():
        return 0
    moved = 0
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix != ".partial":
            moved += kb.import_file_bytes(store.repo, path.name, path.read_bytes())
        path.unlink()
    folder.rmdir()
    if moved:
        log.info("moved the bytes of %d files from %s into the store", moved, folder)
    return moved


class FileService:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock  # what expiry is measured against (tests move it)
        self._sweeper: asyncio.Task | None = None
        # called with (owner, file_id) once a file is deleted: the vector stores stop its
        # ingestions, which depend on this service (so it cannot call them itself)
        self._on_delete: list[Callable[[str, str], None]] = []

    def on_delete(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(owner, file_id)` after each file this service deletes."""
        self._on_delete.append(callback)

    def _now(self) -> int:
        return int(self.clock())

    async def create(
        self,
        owner: str,
        filename: str,
        purpose: str,
        data: bytes,
        content_type: str | None,
        expires_after: FileExpiry | None = None,
    ) -> dict:
        """A new file; with `expires_after`, gone that many seconds after its creation."""
        now = self._now()
        body = {
            "id": new_id("file"),
            "object": "file",
            "bytes": len(data),
            "created_at": now,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None if expires_after is None else now + expires_after.seconds,
        }
        await self.store.call(kb.add_file, owner, body, content_type, data)
        return body

    async def retrieve(self, owner: str, file_id: str, param: str = "file_id") -> dict:
        """The file object; a 404 naming `param` (the request's field that named it) for a
        file that is not the owner's, was deleted or has expired."""
        found = await self.store.call(kb.get_file, owner, file_id, self._now())
        if found is None:
            raise missing_file(file_id, param)
        return found[0]

    async def content(self, owner: str, file_id: str) -> tuple[dict, str | None, bytes]:
        """The file object, its declared content type, and its bytes."""
        found = await self.store.call(kb.file_content, owner, file_id, self._now())
        if found is None:
            raise missing_file(file_id)
        return found

    async def list(self, owner: str, page: Page, purpose: str | None) -> ItemPage:
        return await self.store.call(kb.list_files, owner, page, purpose, self._now())

    async def delete(self, owner: str, file_id: str) -> dict:
        """Delete the file, its bytes and its chunks in every vector store."""
        if not await self.store.call(kb.delete_file, owner, file_id, self._now()):
            raise missing_file(file_id)
        self._deleted(owner, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def _deleted(self, owner: str, file_id: str) -> None:
        for callback in self._on_delete:
            callback(owner, file_id)

    # -- expiry --------------------------------------------------------------------------

    async def delete_expired(self) -> int:
        """Delete every file expired by now, as `delete` does, `SWEEP_BATCH` a
        transaction; returns how many."""
        deleted = 0
        while True:
            gone = await self.store.call(kb.delete_expired_files, self._now(), SWEEP_BATCH)
            for owner, file_id in gone:
                self._deleted(owner, file_id)
            deleted += len(gone)
            if len(gone) < SWEEP_BATCH:
                return deleted

    def start_sweeping(self) -> None:
        """Delete expired files now and then every `SWEEP_SECONDS` (until `stop`)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            try:
                if deleted := await self.delete_expired():
                    log.info("deleted %d expired files", deleted)
            except SQLAlchemyError as exc:  # the database down: try again next time
                log.warning("deleting expired files failed: %s", database_error(exc))
            await asyncio.sleep(SWEEP_SECONDS)

    def cancel(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def stop(self) -> None:
        """`cancel`, then wait for the sweep to unwind, so that the store closes after it."""
        self.cancel()
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)
