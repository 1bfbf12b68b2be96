"""Conversations: a stored, ordered list of items that responses read and append to."""

from __future__ import annotations

import time
from collections.abc import Collection

from orchestrator.conversation_lock import ConversationLock
from orchestrator.errors import NotFoundError
from orchestrator.ids import new_id
from orchestrator.input_resolver import InputResolver
from orchestrator.items import item_list, readable, stored_item
from orchestrator.store import ConversationRow, ItemPage, Page, Repository, Store, metadata_tag


def _conversation(row: ConversationRow) -> dict:
    return {
        "id": row.id,
        "object": "conversation",
        "created_at": row.created_at,
        "metadata": row.metadata,
    }


def etag(conversation: dict) -> str:
    """The ETag of a conversation as the API shows it: a tag of its metadata, which an
    update's `If-Match` names to apply only over what the client read."""
    return metadata_tag(conversation["metadata"])


def _missing(conversation_id: str) -> NotFoundError:
    return NotFoundError(
        f"Conversation with id '{conversation_id}' not found.",
        param="conversation_id",
        code="not_found",
    )


class ConversationService:
    def __init__(self, store: Store, lock: ConversationLock, inputs: InputResolver) -> None:
        self.store = store
        self.lock = lock  # the responses' turns hold it
        self.inputs = inputs  # reads the files of the items given

    async def create(self, owner: str, metadata: dict, items: list[dict]) -> dict:
        row = ConversationRow(new_id("conv"), int(time.time()), metadata)
        await self.store.call(
            Repository.create_conversation,
            owner,
            row.id,
            row.created_at,
            metadata,
            [stored_item(i) for i in await self.inputs.resolve(owner, items, "items")],
        )
        return _conversation(row)

    async def list(self, owner: str, page: Page) -> dict:
        """The owner's conversations, newest first by default: what a client shows as its
        list of chats (OpenAI's API has no such route; the web page needs one)."""
        rows, has_more = await self.store.call(Repository.list_conversations, owner, page)
        return item_list(ItemPage([_conversation(r) for r in rows], has_more=has_more))

    async def retrieve(self, owner: str, conversation_id: str) -> dict:
        row = await self.store.call(Repository.get_conversation, owner, conversation_id)
        if row is None:
            raise _missing(conversation_id)
        return _conversation(row)

    async def update(
        self,
        owner: str,
        conversation_id: str,
        metadata: dict,
        if_match: Collection[str] | None = None,
    ) -> dict:
        """Replace the metadata; with `if_match` (`etag`s), only if the stored one's is
        among them, else PreconditionFailedError: two clients reading, changing and writing
        back the same metadata would otherwise lose one of the two changes."""
        row = await self.store.call(
            Repository.update_conversation, owner, conversation_id, metadata, if_match
        )
        if row is None:
            raise _missing(conversation_id)
        return _conversation(row)

    async def delete(self, owner: str, conversation_id: str) -> dict:
        if not await self.store.call(Repository.delete_conversation, owner, conversation_id):
            raise _missing(conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def add_items(
        self,
        owner: str,
        conversation_id: str,
        items: list[dict],
        include: Collection[str] = (),
    ) -> dict:
        """Append items, after the appends to it before (`ConversationLock.holding`); not
        while a turn runs there (`conversation_locked`): they would land before the turn's
        own input, which it appends when it ends. Their files are read first, without
        holding the conversation. The answer reads them as any read of items does
        (`readable`: output_text logprobs only when `include` asks for them)."""
        stored = [stored_item(i) for i in await self.inputs.resolve(owner, items, "items")]
        async with self.lock.holding(owner, conversation_id, "conversation_id"):
            added = await self.store.call(
                Repository.add_conversation_items, owner, conversation_id, int(time.time()), stored
            )
        if not added:
            raise _missing(conversation_id)
        return item_list(ItemPage(readable(stored, include), has_more=False))

    async def list_items(
        self, owner: str, conversation_id: str, page: Page, include: Collection[str] = ()
    ) -> dict:
        """A page of items; their output_text logprobs only when `include` asks for them
        (`readable`)."""
        found = await self.store.call(
            Repository.list_conversation_items, owner, conversation_id, page
        )
        if found is None:
            raise _missing(conversation_id)
        readable(found.items, include)
        return item_list(found)

    async def retrieve_item(
        self, owner: str, conversation_id: str, item_id: str, include: Collection[str] = ()
    ) -> dict:
        """The item (its output_text logprobs only when `include` asks for them); a 404
        naming what is missing: the conversation, or the item in it."""
        item = await self.store.call(
            Repository.get_conversation_item, owner, conversation_id, item_id
        )
        if item is None:
            await self.retrieve(owner, conversation_id)
            raise NotFoundError(
                f"Item with id '{item_id}' not found.", param="item_id", code="not_found"
            )
        return readable([item], include)[0]

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> dict:
        """Returns the conversation, as OpenAI's API does."""
        await self.retrieve_item(owner, conversation_id, item_id)
        await self.store.call(Repository.delete_conversation_item, owner, conversation_id, item_id)
        return await self.retrieve(owner, conversation_id)
