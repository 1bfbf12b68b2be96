"""A request's input items made ready to store: each `item_reference` replaced by the
stored item it names, and each `input_file` part read into its text.

An `item_reference` (`{"type": "item_reference", "id": ...}`) names an item of the same
owner: an input or output item of an earlier response, or a conversation's item. It
becomes a copy of that item, which gets an id of its own when it is stored (an item
appears once in a conversation), its files as they were read then.

An `input_file` names an uploaded file of the same owner (`file_id`) or carries one
(`filename` + `file_data`, a base64 data URL). Its text is read as file_search reads an
uploaded file (`orchestrator.retrieval.extract`) and kept in the stored part under
`FILE_TEXT`, so that every later prompt that shows the item (this turn's, the next
response's, the conversation's) shows the file as it was then, even after the file is
deleted. Reads of items never show that key (`orchestrator.items.readable`), nor the
inline data: the part reads back as `{"type": "input_file", "file_id", "filename"}`.

One request reads each file and each referenced item once, however many parts or
references name it, and what they bring into its input (the files' texts and the
referenced items, counted each time they are named) must stay within the characters the
model's context could ever hold (`PROMPT_CHARS_PER_TOKEN` per token): a few bytes of
request could otherwise copy a large text thousands of times into memory and the store.
Across requests, the texts of the last KEPT_TEXTS uploaded files read are kept (still
checked to be the owner's and not deleted on each use), and extraction takes one of its
owner's slots (`IngestionSlots`): at most a few files are read at once, whoever asks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TypeVar

from engine.client import TokenizerLike
from engine.errors import ContextLengthExceededError
from orchestrator.context import FILE_TEXT, PROMPT_CHARS_PER_TOKEN, characters
from orchestrator.errors import InvalidRequestError, NotFoundError
from orchestrator.files import FileService, missing_file
from orchestrator.retrieval.extract import ExtractionError, extract_text
from orchestrator.slots import IngestionSlots
from orchestrator.store import Repository, Store

KEPT_TEXTS = 32  # uploaded files' texts kept, each at most a context's worth
T = TypeVar("T")
_DATA_URL = re.compile(r"data:([^;,]*)(?:;[^;,]*)*;base64,", re.IGNORECASE)


def _decoded(file_data: str, param: str) -> tuple[bytes, str | None]:
    """`file_data`'s bytes and declared media type: a `data:<type>;base64,` URL, or bare
    base64."""
    found = _DATA_URL.match(file_data)
    payload = file_data[found.end() :] if found else file_data
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            f"{param} must be base64 data, as a data URL (data:application/pdf;base64,...)",
            param,
        ) from None
    return data, (found.group(1) or None) if found else None


class _Reading:
    """One request's reads: the files and items read so far (by file id or inline data,
    by item id) and the characters still left to bring in."""

    def __init__(self, limit: int, max_model_len: int) -> None:
        self.files: dict[tuple[str, str], tuple[str, str]] = {}  # -> (filename, text)
        self.items: dict[str, dict] = {}
        self.limit = limit
        self.left = limit
        self.max_model_len = max_model_len

    def take(self, count: int, param: str) -> None:
        """Count `count` more characters into the input; a 400 at `param` past the limit."""
        self.left -= count
        if self.left < 0:
            raise InvalidRequestError(
                f"{param}: the files and referenced items of this request hold more than "
                f"{self.limit} characters, more than this model's context of "
                f"{self.max_model_len} tokens could ever hold; give fewer or shorter ones",
                param,
                code="context_length_exceeded",
            )


class InputResolver:
    """Resolves the input items of one owner for one model: the stored items their
    references name, and their files' texts (each must fit the model's context)."""

    def __init__(self, store: Store, tokenizer: TokenizerLike, max_model_len: int) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.files: FileService | None = None  # set when the server keeps uploaded files
        # Extractions at once, in all and per owner: a PDF's is a process of its own.
        self.slots = IngestionSlots()
        # Uploaded files' texts by id, most recently used last: a file never changes, and
        # a conversation about a document names it turn after turn.
        self._texts: OrderedDict[str, tuple[str, str]] = OrderedDict()

    async def resolve(self, owner: str, items: list[dict], param: str) -> list[dict]:
        """`items` (parsed from the request's `param`) with each item_reference replaced by
        the item it names (a 404 naming its `id` when the owner has none of that id) and
        each input_file part's text read: a file that cannot be read or would not fit is a
        400 naming its part, an unknown file id (or another owner's) a 404 naming its
        `file_id`."""
        reading = _Reading(PROMPT_CHARS_PER_TOKEN * self.max_model_len, self.max_model_len)
        resolved = []
        for i, item in enumerate(items):
            where = f"{param}[{i}]"
            if item["type"] == "item_reference":
                resolved.append(await self._referenced(owner, item["id"], f"{where}.id", reading))
            else:
                resolved.append(await self._with_files(owner, item, f"{where}.content", reading))
        return resolved

    async def _referenced(self, owner: str, item_id: str, param: str, reading: _Reading) -> dict:
        """The stored item of that id, without its id."""
        found = reading.items.get(item_id)
        if found is None:
            stored = await self.store.call(Repository.find_item, owner, item_id)
            if stored is None:
                raise NotFoundError(f"Item with id '{item_id}' not found.", param, "not_found")
            found = reading.items[item_id] = {k: v for k, v in stored.items() if k != "id"}
        reading.take(characters(found), param)
        return found

    async def _with_files(self, owner: str, item: dict, param: str, reading: _Reading) -> dict:
        """The item with the text of each of its input_file parts (`param[j]`) read."""
        content = item.get("content")
        if item["type"] != "message" or not any(p["type"] == "input_file" for p in content):
            return item
        parts = [
            await self._file_part(owner, part, f"{param}[{j}]", reading)
            if part["type"] == "input_file"
            else part
            for j, part in enumerate(content)
        ]
        return {**item, "content": parts}

    async def _file_part(self, owner: str, part: dict, param: str, reading: _Reading) -> dict:
        """The part as stored: its file's id (null for inline data), name and text."""
        file_id = part.get("file_id")
        key = (file_id, "") if file_id is not None else (part["filename"], part["file_data"])
        if key not in reading.files:
            reading.files[key] = await self._file_text(owner, part, param)
        filename, text = reading.files[key]
        reading.take(len(text), param)
        return {"type": "input_file", "file_id": file_id, "filename": filename, FILE_TEXT: text}

    async def _file_text(self, owner: str, part: dict, param: str) -> tuple[str, str]:
        """The part's file's name and text, checked to fit the model's context."""
        file_id = part.get("file_id")
        if file_id is None:
            filename = part["filename"]
            data, content_type = _decoded(part["file_data"], f"{param}.file_data")
            return filename, await self._extract(owner, data, filename, content_type, param)
        files = self._uploaded_files(param)
        known = self._texts.get(file_id)
        if known is not None:
            # Used now, before the await: reads of other files meanwhile may evict the
            # oldest texts, which this one must not be while it is being given.
            self._texts.move_to_end(file_id)
            await self._owned(files.retrieve(owner, file_id), file_id, param)  # not deleted
            return known
        body, content_type, data = await self._owned(files.content(owner, file_id), file_id, param)
        text = await self._extract(owner, data, body["filename"], content_type, param)
        self._texts[file_id] = (body["filename"], text)
        if len(self._texts) > KEPT_TEXTS:
            self._texts.popitem(last=False)
        return body["filename"], text

    async def _extract(
        self, owner: str, data: bytes, filename: str, content_type: str | None, param: str
    ) -> str:
        """The file's text, read in one of the owner's extraction slots."""
        async with self.slots.hold(owner):
            try:
                text = await extract_text(data, filename, content_type)
            except ExtractionError as exc:
                raise InvalidRequestError(f"{param}: {exc}", param) from None
            await asyncio.to_thread(self._check_fits, text, filename, param)
        return text

    def _uploaded_files(self, param: str) -> FileService:
        if self.files is None:
            raise InvalidRequestError(
                f"{param}.file_id: this server keeps no uploaded files (it runs without a "
                "data directory); give the file inline as filename and file_data",
                f"{param}.file_id",
            )
        return self.files

    @staticmethod
    async def _owned(lookup: Awaitable[T], file_id: str, param: str) -> T:
        """The lookup's answer; a 404 naming the part's `file_id` for a file the owner
        does not have (never had, another owner's, deleted)."""
        try:
            return await lookup
        except NotFoundError:
            raise missing_file(file_id, f"{param}.file_id") from None

    def _check_fits(self, text: str, filename: str, param: str) -> None:
        """A 400 for a file whose text alone takes the model's whole context."""
        most = self.max_model_len - 1  # at least one token of output
        try:
            self.tokenizer.encode(text, max_tokens=most)
        except ContextLengthExceededError:
            raise InvalidRequestError(
                f"{param}: the text of {filename!r} ({len(text)} characters) is longer than "
                f"this model's context of {self.max_model_len} tokens can hold; give a "
                "shorter file or an excerpt of it",
                param,
                code="context_length_exceeded",
            ) from None
