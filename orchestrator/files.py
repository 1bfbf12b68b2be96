"""Uploaded files: the file objects and their bytes, both in the store.

A file's row and its bytes are written in one transaction, so a file object never names
missing bytes, and every server on a shared database reads the same files. Files an
earlier version kept in `<data dir>/files/<id>` are moved into the store at start
(`import_disk_files`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import NotFoundError
from orchestrator.ids import new_id
from orchestrator.store import ItemPage, Page, Store
from orchestrator.store import knowledge as kb

log = logging.getLogger("tokenmill")

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


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
    def __init__(self, store: Store) -> None:
        self.store = store
        # called with (owner, file_id) once a file is deleted: the vector stores stop its
        # ingestions, which depend on this service (so it cannot call them itself)
        self._on_delete: list[Callable[[str, str], None]] = []

    def on_delete(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(owner, file_id)` after each file this service deletes."""
        self._on_delete.append(callback)

    async def create(
        self, owner: str, filename: str, purpose: str, data: bytes, content_type: str | None
    ) -> dict:
        body = {
            "id": new_id("file"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }
        await self.store.call(kb.add_file, owner, body, content_type, data)
        return body

    async def retrieve(self, owner: str, file_id: str) -> dict:
        found = await self.store.call(kb.get_file, owner, file_id)
        if found is None:
            raise missing_file(file_id)
        return found[0]

    async def content(self, owner: str, file_id: str) -> tuple[dict, str | None, bytes]:
        """The file object, its declared content type, and its bytes."""
        found = await self.store.call(kb.file_content, owner, file_id)
        if found is None:
            raise missing_file(file_id)
        return found

    async def list(self, owner: str, page: Page, purpose: str | None) -> ItemPage:
        return await self.store.call(kb.list_files, owner, page, purpose)

    async def delete(self, owner: str, file_id: str) -> dict:
        """Delete the file, its bytes and its chunks in every vector store."""
        if not await self.store.call(kb.delete_file, owner, file_id):
            raise missing_file(file_id)
        for callback in self._on_delete:
            callback(owner, file_id)
        return {"id": file_id, "object": "file", "deleted": True}
