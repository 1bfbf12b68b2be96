"""The input resolver's reads of uploaded files, against a files service of its own."""

from __future__ import annotations

import asyncio

from orchestrator import input_resolver
from orchestrator.input_resolver import InputResolver


class _Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = False, max_tokens=None) -> list[int]:
        return [0] * len(text.split())


class _Files:
    """Uploaded text files by id; a retrieve of a file in `held` waits for `release`."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def retrieve(self, owner: str, file_id: str) -> dict:
        if file_id in self.held:
            self.waiting.set()
            await self.release.wait()
        return {"id": file_id, "filename": f"{file_id}.txt"}

    async def content(self, owner: str, file_id: str) -> tuple[dict, str | None, bytes]:
        return await self.retrieve(owner, file_id), "text/plain", f"text of {file_id}".encode()


def _message(file_id: str) -> dict:
    part = {"type": "input_file", "file_id": file_id}
    return {"type": "message", "role": "user", "content": [part]}


def test_a_kept_text_evicted_while_its_file_is_checked_is_still_given(monkeypatch):
    """A request finds a file's text kept, and checks the file is still the owner's; other
    requests reading new files meanwhile may push that text out of the full cache. The
    request still gets the text it found (no KeyError, a 500, on moving it to the end)."""
    monkeypatch.setattr(input_resolver, "KEPT_TEXTS", 1)

    async def scenario() -> tuple[list[dict], list[dict]]:
        files = _Files()
        resolver = InputResolver(None, _Tokenizer(), max_model_len=1000)
        resolver.files = files
        await resolver.resolve("alice", [_message("file_a")], "input")  # kept
        files.held.add("file_a")
        first = asyncio.create_task(resolver.resolve("alice", [_message("file_a")], "input"))
        await files.waiting.wait()
        second = await resolver.resolve("alice", [_message("file_b")], "input")  # evicts a
        files.release.set()
        return await first, second

    first, second = asyncio.run(scenario())
    [part] = first[0]["content"]
    assert part["filename"] == "file_a.txt" and "text of file_a" in str(part)
    assert second[0]["content"][0]["filename"] == "file_b.txt"
