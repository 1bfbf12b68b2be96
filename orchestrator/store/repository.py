"""The repositories: every read and write of the product's data, and the only SQL in it.

Each public method takes the owner's id and filters every statement on it, so ownership
is enforced here once rather than in each route. Methods are synchronous and run on the
`Store`'s single worker thread (see `store.py`); a method is one transaction, so a
crash leaves each turn either recorded whole or not at all.
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Engine,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql import ColumnElement

from orchestrator.errors import NotFoundError, PreconditionFailedError
from orchestrator.store.storage_quota import check_given_items, kept_output_bytes
from orchestrator.store.tables import (
    conversation_items,
    conversations,
    cursor_tombstones,
    response_items,
    responses,
    storage_holds,
)

Order = Literal["asc", "desc"]

# The columns of a response that the next turn's `History` reads (`_history`).
# The `error` of a response a crash cut off (`Repository.interrupt_unfinished`): its
# client (a background response's, polling) learns why it ended. `server_error` is the
# closest of the OpenAI SDK's ResponseError codes.
INTERRUPTED = {
    "code": "server_error",
    "message": "the server stopped before this response finished; "
    "its output is what it had generated until then",
}
# The statuses of a response that has not ended: waiting for its place, or running.
UNFINISHED = ("queued", "in_progress")

_HISTORY_COLUMNS = (
    responses.c.context_tokens,
    responses.c.history_start_item,
    responses.c.history_start,
)


def _chain_statements() -> tuple[Select, Select, Select]:
    """The three reads of `Repository.response_history`, built once: the head response's
    status and history columns, the chain's root (the oldest response it reaches through
    `previous_response_id`) and the chain's items, oldest response first. Built per call,
    the recursive CTE and its alias took three quarters of the method's CPU time (SQL
    expression construction, not SQLite), and every turn that names a previous response
    runs it on the store's one writer thread."""
    response_id, owner = bindparam("response_id"), bindparam("owner")
    head = select(responses.c.status, *_HISTORY_COLUMNS).where(
        responses.c.id == response_id, responses.c.owner_id == owner
    )
    chain = (
        select(responses.c.id, responses.c.previous_response_id, literal(0).label("depth"))
        .where(responses.c.id == response_id, responses.c.owner_id == owner)
        .cte("chain", recursive=True)
    )
    parent = responses.alias("parent")
    chain = chain.union_all(
        select(parent.c.id, parent.c.previous_response_id, chain.c.depth + 1).where(
            and_(parent.c.id == chain.c.previous_response_id, parent.c.owner_id == owner)
        )
    )
    root = select(chain.c.id).order_by(chain.c.depth.desc()).limit(1)
    items = (
        select(response_items.c.body)
        .join(chain, response_items.c.response_id == chain.c.id)
        .where(response_items.c.owner_id == owner)
        .order_by(chain.c.depth.desc(), response_items.c.seq)
    )
    return head, root, items


_CHAIN_HEAD, _CHAIN_ROOT, _CHAIN_ITEMS = _chain_statements()


@dataclass(frozen=True)
class Page:
    """A cursor page: up to `limit` items in `order`, those right after the item `after`,
    or those right before the item `before` (the previous page)."""

    limit: int = 20
    after: str | None = None
    order: Order = "desc"
    before: str | None = None


@dataclass
class ItemPage:
    items: list[dict]
    has_more: bool


@dataclass
class ConversationRow:
    id: str
    created_at: int
    metadata: dict


def metadata_tag(metadata: dict) -> str:
    """A strong ETag of a conversation's metadata: a client that read it can ask for its
    update to apply only if no one changed the metadata since (`If-Match`). A hash rather
    than a version column, so every stored conversation has one already."""
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(canonical.encode()).hexdigest()[:32] + '"'


@dataclass
class History:
    """What came before a turn: items oldest first, the token ids of the latest recorded
    turn's prompt and output (None when unknown), which the next prompt extends so the
    prefix cache serves it, and where that prompt's history started (`start`: how many of
    these items it left out, truncation "auto"), where the next prompt starts too while
    it fits. The store records that start as the id of the item there (`_history_start`),
    so it holds as the history grows and as earlier items are deleted."""

    items: list[dict]
    context_tokens: list[int] | None
    start: int = 0


def _history(items: list[dict], previous: Row | None) -> History:
    """The history of `items` after the response `previous` (a row with its
    `context_tokens`, `history_start_item` and `history_start`, or None: no response
    recorded)."""
    if previous is None:
        return History(items, None)
    return History(items, unpack_tokens(previous.context_tokens), _history_start(items, previous))


def _history_start(items: list[dict], previous: Row) -> int:
    """Where `previous`'s last prompt started its history in `items`: at the item it
    started at, wherever deleting earlier items moved it. Once that item is gone, so is
    that prompt's prefix: the whole history, truncated anew. A response recorded before
    migration 0014 has a count instead (null before 0013: the whole history)."""
    first = previous.history_start_item
    if first is None:
        return previous.history_start or 0
    return next((i for i, item in enumerate(items) if item["id"] == first), 0)


def pack_tokens(ids: list[int]) -> bytes:
    packed = array.array("I", ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(data: bytes | None) -> list[int] | None:
    if data is None:
        return None
    packed = array.array("I")
    packed.frombytes(data)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def delete_owned(conn: Connection, table: Any, owner: str, **equal: str) -> int:
    """Delete the owner's rows of `table` whose columns equal `equal`; how many went
    (the owner is part of the statement, so another user's rows are never touched)."""
    return conn.execute(
        delete(table).where(table.c.owner_id == owner, *(table.c[k] == v for k, v in equal.items()))
    ).rowcount


def written_by(table: Any, server_id: str | None) -> list[ColumnElement[bool]]:
    """The WHERE clause of `table`'s rows that server `server_id` wrote (None: all rows)."""
    return [] if server_id is None else [table.c.server_id == server_id]


# How long a deleted object's id still marks its place as a list's cursor: far longer than
# any loop paging through a list takes, short enough that the tombstones stay few.
TOMBSTONE_SECONDS = 86_400


def delete_listed(
    conn: Connection,
    table: Any,
    parent_column: Any,
    parent_id: str,
    owner: str,
    *where: ColumnElement[bool],
    position: Any = None,
) -> int:
    """Delete the owner's rows of `table` in the list of `parent_id` (its `parent_column`)
    that meet `where`, leaving each a tombstone at its place in the list (`position`, by
    default `seq`), so that its id still works as the list's cursor; how many went. The
    rows are deleted first (RETURNING what they were): a deletion racing this one on
    PostgreSQL waits for it, then finds nothing and buries nothing."""
    position = table.c.seq if position is None else position
    gone = conn.execute(
        delete(table)
        .where(parent_column == parent_id, table.c.owner_id == owner, *where)
        .returning(table.c.id, position)
    ).all()
    if gone:
        _bury(conn, table.name, parent_id, owner, [(row[0], row[1]) for row in gone])
    return len(gone)


def _bury(
    conn: Connection, list_name: str, parent_id: str, owner: str, gone: list[tuple[str, int]]
) -> None:
    """Record where the objects `gone` (id, position) were in the list, replacing an older
    tombstone of the same id (an object deleted, added again, deleted again), and purge
    the tombstones past their time, which no cursor resolves any more."""
    now = int(time.time())
    t = cursor_tombstones
    conn.execute(delete(t).where(t.c.deleted_at < now - TOMBSTONE_SECONDS))
    conn.execute(
        delete(t).where(
            t.c.list_name == list_name,
            t.c.parent_id == parent_id,
            t.c.id.in_([object_id for object_id, _ in gone]),
        )
    )
    conn.execute(
        insert(t),
        [
            {
                "list_name": list_name,
                "parent_id": parent_id,
                "id": object_id,
                "owner_id": owner,
                "position": position,
                "deleted_at": now,
            }
            for object_id, position in gone
        ],
    )


def forget_list(conn: Connection, table: Any, parent_id: str, owner: str) -> None:
    """Delete the tombstones of the list of `parent_id`'s rows of `table`: the parent is
    being deleted, and its lists with it."""
    t = cursor_tombstones
    conn.execute(
        delete(t).where(
            t.c.list_name == table.name, t.c.parent_id == parent_id, t.c.owner_id == owner
        )
    )


def cursor_position(
    conn: Connection,
    table: Any,
    parent_column: Any,
    parent_id: str,
    owner: str,
    cursor: str,
    position: Any = None,
) -> Any:
    """The place of the object `cursor` in the owner's list of `parent_id`'s rows of
    `table` (`position`, by default `seq`): where it is, or where it was when deleted
    (within `TOMBSTONE_SECONDS`); None for an id that never named an object of this list
    (made up, another user's, another list's)."""
    position = table.c.seq if position is None else position
    found = conn.execute(
        select(position).where(
            parent_column == parent_id, table.c.owner_id == owner, table.c.id == cursor
        )
    ).scalar()
    if found is not None:
        return found
    t = cursor_tombstones
    return conn.execute(
        select(t.c.position).where(
            t.c.list_name == table.name,
            t.c.parent_id == parent_id,
            t.c.owner_id == owner,
            t.c.id == cursor,
            t.c.deleted_at >= int(time.time()) - TOMBSTONE_SECONDS,
        )
    ).scalar()


def unknown_cursor(page: Page, kind: str) -> NotFoundError:
    """A cursor that never named an object of the list, or one deleted longer ago than
    `TOMBSTONE_SECONDS`: an empty page would tell the client the list had ended."""
    param = "before" if page.before is not None else "after"
    cursor = page.before if page.before is not None else page.after
    return NotFoundError(f"{kind} with id '{cursor}' not found.", param=param, code="not_found")


def _body(row: Row) -> dict:
    return row.body


def _page(
    conn: Connection,
    table,
    parent_column,
    parent_id: str,
    owner: str,
    page: Page,
    columns: Sequence[ColumnElement] = (),
    item: Callable[[Row], dict] = _body,
    only: Sequence[ColumnElement] = (),
) -> ItemPage:
    """One page of a parent's items in insertion order (`seq`), the cursor being an item id.
    A `before` page is read backwards from its cursor, then put in the list's order. Each
    item is its row's `body`, or what `item` makes of the body and `columns` (an item
    whose fields live in columns of their own reads them in the same statement).
    `only`: conditions an item must meet to be listed (a filter by status or batch). The
    cursor is found among all the parent's items, not just those: the last item of a page
    of files `in_progress` may be `completed` by the time the next page is asked for; and
    among those deleted since (`cursor_position`), so a loop deleting each item of a page
    before asking for the next one sees them all."""
    where = [parent_column == parent_id, table.c.owner_id == owner, *only]
    backwards = page.before is not None
    cursor = page.before if backwards else page.after
    rising = (page.order == "asc") != backwards  # the direction rows are read in
    if cursor is not None:
        cursor_seq = cursor_position(conn, table, parent_column, parent_id, owner, cursor)
        if cursor_seq is None:
            raise unknown_cursor(page, "Item")
        where.append(table.c.seq > cursor_seq if rising else table.c.seq < cursor_seq)
    order = table.c.seq.asc() if rising else table.c.seq.desc()
    query = select(table.c.body, *columns).where(*where).order_by(order).limit(page.limit + 1)
    rows = conn.execute(query).all()
    items = [item(row) for row in rows[: page.limit]]
    if backwards:
        items.reverse()
    return ItemPage(items, has_more=len(rows) > page.limit)


class Repository:
    def __init__(self, engine: Engine, server_id: str | None = None) -> None:
        self.engine = engine
        # This server's id, written in the rows of the turns it runs (`servers.py`): on
        # PostgreSQL, so that another server can end them if this one crashes.
        self.server_id = server_id
        # PostgreSQL's retrieval index, once knowledge.prepare_index made it.
        self.retrieval_index: Any = None

    # -- conversations -------------------------------------------------------------------

    def create_conversation(
        self, owner: str, conversation_id: str, created_at: int, metadata: dict, items: list[dict]
    ) -> None:
        """The conversation with the client's `items`; StorageQuotaExceededError when the
        images they keep do not fit the owner's storage quota (`check_given_items`)."""
        with self.engine.begin() as conn:
            check_given_items(conn, owner, items, created_at, "items")
            conn.execute(
                insert(conversations).values(
                    id=conversation_id, owner_id=owner, created_at=created_at, meta=metadata
                )
            )
            self._append_items(conn, owner, conversation_id, created_at, items)

    def get_conversation(self, owner: str, conversation_id: str) -> ConversationRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(conversations.c.id, conversations.c.created_at, conversations.c.meta).where(
                    conversations.c.id == conversation_id, conversations.c.owner_id == owner
                )
            ).first()
        return None if row is None else ConversationRow(row.id, row.created_at, row.meta)

    def update_conversation(
        self,
        owner: str,
        conversation_id: str,
        metadata: dict,
        if_match: Collection[str] | None = None,
    ) -> ConversationRow | None:
        """Replace the metadata; with `if_match`, only while the stored metadata's tag is
        one of those (compared under the row's lock, so two writers cannot both pass)."""
        where = (conversations.c.id == conversation_id, conversations.c.owner_id == owner)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(conversations.c.created_at, conversations.c.meta)
                .where(*where)
                .with_for_update()
            ).first()
            if row is None:
                return None
            if if_match is not None and metadata_tag(row.meta) not in if_match:
                raise PreconditionFailedError(
                    "The conversation's metadata changed since it was read (If-Match).",
                    param="If-Match",
                    code="precondition_failed",
                )
            conn.execute(update(conversations).where(*where).values(meta=metadata))
        return ConversationRow(conversation_id, row.created_at, metadata)

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        table = conversations
        with self.engine.begin() as conn:
            delete_owned(conn, conversation_items, owner, conversation_id=conversation_id)
            forget_list(conn, conversation_items, conversation_id, owner)
            deleted = delete_listed(
                conn,
                table,
                table.c.owner_id,
                owner,
                owner,
                table.c.id == conversation_id,
                position=table.c.created_at,
            )
            return deleted > 0

    def list_conversations(self, owner: str, page: Page) -> tuple[list[ConversationRow], bool]:
        """A page of the owner's conversations by creation time (then id), after the
        conversation `page.after` or before `page.before` (or where it was: deleted), and
        whether there are more."""
        table = conversations
        where = [table.c.owner_id == owner]
        backwards = page.before is not None
        cursor_id = page.before if backwards else page.after
        rising = (page.order == "asc") != backwards  # the direction rows are read in
        with self.engine.connect() as conn:
            if cursor_id is not None:
                owned = table.c.owner_id
                cursor = cursor_position(
                    conn, table, owned, owner, owner, cursor_id, position=table.c.created_at
                )
                if cursor is None:
                    raise unknown_cursor(page, "Conversation")
                newer = table.c.created_at > cursor if rising else table.c.created_at < cursor
                tie = table.c.id > cursor_id if rising else table.c.id < cursor_id
                where.append(or_(newer, and_(table.c.created_at == cursor, tie)))
            order = (
                (table.c.created_at.asc(), table.c.id.asc())
                if rising
                else (table.c.created_at.desc(), table.c.id.desc())
            )
            rows = conn.execute(
                select(table.c.id, table.c.created_at, table.c.meta)
                .where(*where)
                .order_by(*order)
                .limit(page.limit + 1)
            ).all()
        found = [ConversationRow(r.id, r.created_at, r.meta) for r in rows[: page.limit]]
        if backwards:
            found.reverse()
        return found, len(rows) > page.limit

    def add_conversation_items(
        self, owner: str, conversation_id: str, created_at: int, items: list[dict]
    ) -> bool:
        """Append the client's `items` (False: no such conversation of the owner's);
        StorageQuotaExceededError when the images they keep do not fit the owner's storage
        quota (`check_given_items`)."""
        with self.engine.begin() as conn:
            if not self._owns_conversation(conn, owner, conversation_id):
                return False
            check_given_items(conn, owner, items, created_at, "items")
            self._append_items(conn, owner, conversation_id, created_at, items)
        return True

    def list_conversation_items(
        self, owner: str, conversation_id: str, page: Page
    ) -> ItemPage | None:
        with self.engine.connect() as conn:
            if not self._owns_conversation(conn, owner, conversation_id):
                return None
            return _page(
                conn,
                conversation_items,
                conversation_items.c.conversation_id,
                conversation_id,
                owner,
                page,
            )

    def get_conversation_item(self, owner: str, conversation_id: str, item_id: str) -> dict | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(conversation_items.c.body).where(
                    conversation_items.c.conversation_id == conversation_id,
                    conversation_items.c.owner_id == owner,
                    conversation_items.c.id == item_id,
                )
            ).scalar()

    def delete_conversation_item(self, owner: str, conversation_id: str, item_id: str) -> bool:
        t = conversation_items
        with self.engine.begin() as conn:
            deleted = delete_listed(
                conn, t, t.c.conversation_id, conversation_id, owner, t.c.id == item_id
            )
        return deleted > 0

    def conversation_history(self, owner: str, conversation_id: str) -> History | None:
        with self.engine.connect() as conn:
            last = conn.execute(
                select(conversations.c.last_response_id).where(
                    conversations.c.id == conversation_id,
                    conversations.c.owner_id == owner,
                )
            ).first()
            if last is None:
                return None
            items = (
                conn.execute(
                    select(conversation_items.c.body)
                    .where(
                        conversation_items.c.conversation_id == conversation_id,
                        conversation_items.c.owner_id == owner,
                    )
                    .order_by(conversation_items.c.seq)
                )
                .scalars()
                .all()
            )
            previous = None
            if last.last_response_id is not None:
                previous = conn.execute(
                    select(*_HISTORY_COLUMNS).where(
                        responses.c.id == last.last_response_id,
                        responses.c.owner_id == owner,
                    )
                ).first()
        return _history(list(items), previous)

    @staticmethod
    def _owns_conversation(conn: Connection, owner: str, conversation_id: str) -> bool:
        return (
            conn.execute(
                select(conversations.c.id).where(
                    conversations.c.id == conversation_id,
                    conversations.c.owner_id == owner,
                )
            ).first()
            is not None
        )

    @staticmethod
    def _append_items(
        conn: Connection, owner: str, conversation_id: str, created_at: int, items: list[dict]
    ) -> None:
        if items:
            conn.execute(
                insert(conversation_items),
                [
                    {
                        "id": item["id"],
                        "conversation_id": conversation_id,
                        "owner_id": owner,
                        "created_at": created_at,
                        "body": item,
                        "output_bytes": kept_output_bytes(item),
                    }
                    for item in items
                ],
            )

    @classmethod
    def _append_turn(
        cls,
        conn: Connection,
        owner: str,
        conversation_id: str,
        response_id: str,
        created_at: int,
        items: list[dict],
    ) -> None:
        """Append a response's input and output items to its conversation, recording its
        place there (the conversation's last seq before them, which no later item can
        take) and making it the conversation's latest response. Nothing else appends to
        the conversation meanwhile: its turn holds it (`conversation_lock.py`)."""
        place = conn.execute(
            select(func.coalesce(func.max(conversation_items.c.seq), 0)).where(
                conversation_items.c.conversation_id == conversation_id,
                conversation_items.c.owner_id == owner,
            )
        ).scalar_one()
        cls._append_items(conn, owner, conversation_id, created_at, items)
        conn.execute(
            update(responses)
            .where(responses.c.id == response_id, responses.c.owner_id == owner)
            .values(conversation_seq=place)
        )
        conn.execute(
            update(conversations)
            .where(conversations.c.id == conversation_id, conversations.c.owner_id == owner)
            .values(last_response_id=response_id)
        )

    # -- responses -----------------------------------------------------------------------

    def begin_response(self, owner: str, body: dict, input_items: list[dict]) -> None:
        """Record a turn as it starts (status in_progress, or queued), with its input items;
        StorageQuotaExceededError when the images they keep do not fit the owner's storage
        quota (`check_given_items`): from then on they count in it, as the response's."""
        with self.engine.begin() as conn:
            check_given_items(conn, owner, input_items, int(body["created_at"]), "input")
            conn.execute(
                insert(responses).values(
                    id=body["id"],
                    owner_id=owner,
                    created_at=body["created_at"],
                    status=body["status"],
                    previous_response_id=body["previous_response_id"],
                    conversation_id=_conversation_id(body),
                    body=_without_output(body),
                    server_id=self.server_id,
                )
            )
            self._insert_response_items(conn, owner, body["id"], "input", input_items)

    def finish_response(
        self,
        owner: str,
        body: dict,
        input_items: list[dict],
        context_tokens: list[int] | None,
        history_start: str | None,
    ) -> None:
        """Record a turn's final state, its output items, and (with a conversation) its
        input and output items appended to the conversation: all in one transaction.
        `context_tokens` and `history_start`: its last prompt + output, and the id of the
        history item that prompt started at (None: the whole history; `History`)."""
        output = body["output"]
        with self.engine.begin() as conn:
            conn.execute(
                update(responses)
                .where(
                    responses.c.id == body["id"],
                    responses.c.owner_id == owner,
                )
                .values(
                    status=body["status"],
                    body=_without_output(body),
                    context_tokens=None if context_tokens is None else pack_tokens(context_tokens),
                    history_start_item=history_start,
                )
            )
            self._replace_output(conn, owner, body["id"], output)
            _drop_storage_holds(conn, body["id"])
            conversation_id = _conversation_id(body)
            if conversation_id is not None and self._owns_conversation(
                conn, owner, conversation_id
            ):
                self._append_turn(
                    conn,
                    owner,
                    conversation_id,
                    body["id"],
                    int(body["created_at"]),
                    [*input_items, *output],
                )

    def leave_queue(self, owner: str, response_id: str) -> None:
        """A queued response starts: it is `in_progress`."""
        where = (
            responses.c.id == response_id,
            responses.c.owner_id == owner,
            responses.c.status == "queued",
        )
        with self.engine.begin() as conn:
            body = conn.execute(select(responses.c.body).where(*where)).scalar()
            if body is not None:
                conn.execute(
                    update(responses)
                    .where(*where)
                    .values(status="in_progress", body={**body, "status": "in_progress"})
                )

    def checkpoint_response(
        self, owner: str, response_id: str, output: list[dict], usage: dict | None = None
    ) -> None:
        """A response's output items (and its usage) as they stand mid-turn, so that a
        crash loses at most what came since (`interrupt_unfinished` keeps them);
        `finish_response` replaces them with the final ones."""
        with self.engine.begin() as conn:
            self._replace_output(conn, owner, response_id, output)
            if usage is not None:
                where = (responses.c.id == response_id, responses.c.owner_id == owner)
                body = conn.execute(select(responses.c.body).where(*where)).scalar()
                if body is not None:
                    conn.execute(
                        update(responses).where(*where).values(body={**body, "usage": usage})
                    )

    def _replace_output(
        self, conn: Connection, owner: str, response_id: str, output: list[dict]
    ) -> None:
        conn.execute(
            delete(response_items).where(
                response_items.c.response_id == response_id,
                response_items.c.owner_id == owner,
                response_items.c.kind == "output",
            )
        )
        self._insert_response_items(conn, owner, response_id, "output", output)

    def get_response(self, owner: str, response_id: str) -> dict | None:
        """The response as stored. Its output is read before its body: each read sees the
        latest commit (no snapshot spans the two), and a checkpoint commits output and
        usage together, so read in this order the usage is never older than the output."""
        with self.engine.connect() as conn:
            output = self._item_bodies(conn, owner, response_id, "output")
            body = conn.execute(
                select(responses.c.body).where(
                    responses.c.id == response_id, responses.c.owner_id == owner
                )
            ).scalar()
        if body is None:
            return None
        return {**body, "output": output}

    @staticmethod
    def _item_bodies(conn: Connection, owner: str, response_id: str, kind: str) -> list[dict]:
        """A response's input or output items, in order."""
        return list(
            conn.execute(
                select(response_items.c.body)
                .where(
                    response_items.c.response_id == response_id,
                    response_items.c.owner_id == owner,
                    response_items.c.kind == kind,
                )
                .order_by(response_items.c.seq)
            ).scalars()
        )

    def find_item(self, owner: str, item_id: str) -> dict | None:
        """The owner's stored item of that id: an input or output item of a response, or a
        conversation's item (a response's items in a conversation are the same items)."""
        with self.engine.connect() as conn:
            for table in (response_items, conversation_items):
                body = conn.execute(
                    select(table.c.body)
                    .where(table.c.id == item_id, table.c.owner_id == owner)
                    .limit(1)
                ).scalar()
                if body is not None:
                    return body
        return None

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self.engine.begin() as conn:
            delete_owned(conn, response_items, owner, response_id=response_id)
            return delete_owned(conn, responses, owner, id=response_id) > 0

    def list_input_items(self, owner: str, response_id: str, page: Page) -> ItemPage | None:
        with self.engine.connect() as conn:
            exists = conn.execute(
                select(responses.c.id).where(
                    responses.c.id == response_id, responses.c.owner_id == owner
                )
            ).first()
            if exists is None:
                return None
            inputs = response_items.select().where(response_items.c.kind == "input").subquery()
            return _page(conn, inputs, inputs.c.response_id, response_id, owner, page)

    def response_history(self, owner: str, response_id: str) -> tuple[str, History] | None:
        """The chain ending at `response_id` (its status, and every response's input then
        output items, oldest response first), found with one recursive query. A chain that
        starts at a response made in a conversation starts with the conversation's items
        from before that response still there (`_conversation_before`)."""
        params = {"response_id": response_id, "owner": owner}
        with self.engine.connect() as conn:
            head = conn.execute(_CHAIN_HEAD, params).first()
            if head is None:
                return None
            root = conn.execute(_CHAIN_ROOT, params).scalar_one()
            items = conn.execute(_CHAIN_ITEMS, params).scalars().all()
            before = self._conversation_before(conn, owner, root)
        return head.status, _history([*before, *items], head)

    @staticmethod
    def _conversation_before(conn: Connection, owner: str, response_id: str) -> list[dict]:
        """The items of the response's conversation (if any) up to its place there
        (`conversation_seq`): those it followed, less any deleted since. Nothing when its
        place is unknown (its items were deleted before migration 0011 recorded it)."""
        place = conn.execute(
            select(responses.c.conversation_id, responses.c.conversation_seq).where(
                responses.c.id == response_id, responses.c.owner_id == owner
            )
        ).first()
        if place is None or place.conversation_seq is None:
            return []
        return list(
            conn.execute(
                select(conversation_items.c.body)
                .where(
                    conversation_items.c.conversation_id == place.conversation_id,
                    conversation_items.c.owner_id == owner,
                    conversation_items.c.seq <= place.conversation_seq,
                )
                .order_by(conversation_items.c.seq)
            )
            .scalars()
            .all()
        )

    def conversation_busy(self, owner: str, conversation_id: str, since: int) -> bool:
        """Whether a response in the conversation, begun at `since` or later, has not
        ended: another server on the same database running (or queueing) a turn there."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(responses.c.id).where(
                        responses.c.conversation_id == conversation_id,
                        responses.c.owner_id == owner,
                        responses.c.status.in_(UNFINISHED),
                        responses.c.created_at >= since,
                    )
                ).first()
                is not None
            )

    def interrupt_unfinished(self, server_id: str | None = None) -> int:
        """Mark every response still `in_progress` or `queued` (with `server_id`, only
        those that server ran) as `incomplete`: maintenance for turns cut off by a crash, which will
        never finish: at start-up on a database only this server uses, or for a crashed
        server on a shared one (`servers.py`). Its output as last checkpointed is kept,
        the items still being written marked `incomplete`; a turn in a conversation gets
        its input and those output items appended there, as `finish_response` would have,
        so the history keeps the user's message and what the model had said. It has no
        `incomplete_details`, as a turn whose client went away (`ResponseEvents.finish`),
        and an `error` saying the server stopped (`INTERRUPTED`).
        Acts for all owners; returns how many it marked."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(
                    responses.c.id,
                    responses.c.owner_id,
                    responses.c.conversation_id,
                    responses.c.created_at,
                    responses.c.body,
                )
                .where(responses.c.status.in_(UNFINISHED), *written_by(responses, server_id))
                .order_by(responses.c.created_at, responses.c.id)
            ).all()
            for row in rows:
                body = {
                    **row.body,
                    "status": "incomplete",
                    "incomplete_details": None,
                    "error": INTERRUPTED,
                }
                conn.execute(
                    update(responses)
                    .where(responses.c.id == row.id)
                    .values(status="incomplete", body=body)
                )
                output = self._close_interrupted_output(conn, row.owner_id, row.id)
                _drop_storage_holds(conn, row.id)
                if row.conversation_id is not None and self._owns_conversation(
                    conn, row.owner_id, row.conversation_id
                ):
                    self._keep_interrupted_turn(conn, row, output)
        return len(rows)

    def _close_interrupted_output(
        self, conn: Connection, owner: str, response_id: str
    ) -> list[dict]:
        """The checkpointed output, with the items still `in_progress` now `incomplete`."""
        output = [
            {**body, "status": "incomplete"} if body.get("status") == "in_progress" else body
            for body in self._item_bodies(conn, owner, response_id, "output")
        ]
        self._replace_output(conn, owner, response_id, output)
        return output

    def _keep_interrupted_turn(self, conn: Connection, row, output: list[dict]) -> None:
        inputs = self._item_bodies(conn, row.owner_id, row.id, "input")
        self._append_turn(
            conn,
            row.owner_id,
            row.conversation_id,
            row.id,
            int(row.created_at),
            [*inputs, *output],
        )

    @staticmethod
    def _insert_response_items(
        conn: Connection, owner: str, response_id: str, kind: str, items: list[dict]
    ) -> None:
        if items:
            conn.execute(
                insert(response_items),
                [
                    {
                        "id": item["id"],
                        "response_id": response_id,
                        "owner_id": owner,
                        "kind": kind,
                        "body": item,
                        "output_bytes": kept_output_bytes(item),
                    }
                    for item in items
                ],
            )


def _drop_storage_holds(conn: Connection, response_id: str) -> None:
    """A response's output is written for good: its items now count the storage its
    code_interpreter images take, and only those it kept (`knowledge.hold_storage`)."""
    conn.execute(delete(storage_holds).where(storage_holds.c.response_id == response_id))


def _conversation_id(body: dict) -> str | None:
    conversation = body.get("conversation")
    return conversation["id"] if conversation else None


def _without_output(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "output"}
