"""Uploaded files: the file objects in the store, their bytes in `<data dir>/files/<id>`.

The bytes are written (and fsynced) before the row is committed, so a file object never
names missing bytes; a crash between the two leaves only an orphaned blob.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from orchestrator.errors import NotFoundError
from orchestrator.ids import new_id
from orchestrator.store import ItemPage, Page, Store
from orchestrator.store import knowledge as kb

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def missing_file(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param="file_id", code="not_found")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)


class FileService:
    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.folder = Path(data_dir).expanduser() / "files"

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

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
        await asyncio.to_thread(_write, self.path(body["id"]), data)
        await self.store.call(kb.add_file, owner, body, content_type)
        return body

    async def retrieve(self, owner: str, file_id: str) -> dict:
        found = await self.store.call(kb.get_file, owner, file_id)
        if found is None:
            raise missing_file(file_id)
        return found[0]

    async def content(self, owner: str, file_id: str) -> tuple[dict, str | None, bytes]:
        """The file object, its declared content type, and its bytes."""
        found = await self.store.call(kb.get_file, owner, file_id)
        if found is None:
            raise missing_file(file_id)
        data = await asyncio.to_thread(self.path(file_id).read_bytes)
        return found[0], found[1], data

    async def list(self, owner: str, page: Page, purpose: str | None) -> ItemPage:
        return await self.store.call(kb.list_files, owner, page, purpose)

    async def delete(self, owner: str, file_id: str) -> dict:
        """Delete the file, its chunks in every vector store, and its bytes."""
        if not await self.store.call(kb.delete_file, owner, file_id):
            raise missing_file(file_id)
        await asyncio.to_thread(self.path(file_id).unlink, True)
        return {"id": file_id, "object": "file", "deleted": True}
