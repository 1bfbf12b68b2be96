"""The store on SQLite and on a real PostgreSQL: schema, ownership, history, deletion."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData, event, func, insert, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.errors import NotFoundError
from orchestrator.retrieval import pg_index
from orchestrator.retrieval.index import (
    VECTOR_CHUNK,
    SearchRequest,
    cjk_bigrams,
    retrieval_chunks,
    vectors_ddl,
)
from orchestrator.store import (
    Page,
    Repository,
    Store,
    accounts,
    database_error,
    hold_data_dir,
    hold_database,
    repository,
    sqlite_url,
)
from orchestrator.store import knowledge as kb
from orchestrator.store import store as store_module
from orchestrator.store.accounts import KeyRow
from orchestrator.store.repository import pack_tokens
from orchestrator.store.store import MIGRATIONS, SchemaTooNewError, create_db_engine
from orchestrator.store.tables import (
    conversation_items,
    cursor_tombstones,
    file_blobs,
    files,
    metadata,
    response_items,
    responses,
    vector_store_files,
    vector_stores,
)


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    yield store
    store.close()


def _run_together(functions: list) -> None:
    """Call `functions` each on a thread of its own, all started before any is waited on
    (for at most two minutes each)."""
    threads = [threading.Thread(target=f) for f in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def _count(store: Store, table, **where) -> int:
    with store.engine.connect() as conn:
        query = (
            select(func.count())
            .select_from(table)
            .where(*(table.c[k] == v for k, v in where.items()))
        )
        return conn.execute(query).scalar_one()


def _message(item_id: str, text: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }


def _record(
    repo: Repository,
    owner: str,
    response_id: str,
    previous: str | None,
    text: str,
    conversation: str | None = None,
    tokens=(1, 2, 3),
    start: str | None = None,
) -> None:
    body = {
        "id": response_id,
        "created_at": 1.0,
        "status": "in_progress",
        "previous_response_id": previous,
        "output": [],
        "conversation": {"id": conversation} if conversation else None,
    }
    inputs = [_message(f"msg_in_{response_id}", text)]
    repo.begin_response(owner, body, inputs)
    output = [{**_message(f"msg_out_{response_id}", text.upper()), "role": "assistant"}]
    repo.finish_response(
        owner, {**body, "status": "completed", "output": output}, inputs, list(tokens), start
    )


def _declared_schema(dialect: str) -> MetaData:
    """The store's tables, plus the retrieval index's chunks table on SQLite."""
    declared = MetaData()
    for table in metadata.tables.values():
        table.to_metadata(declared)
    if dialect == "sqlite":
        retrieval_chunks.to_metadata(declared)
    return declared


def _not_virtual(name, type_, _parent) -> bool:
    """sqlite-vec's and FTS5's virtual tables (and their shadow tables) are created by
    raw DDL that SQLAlchemy cannot declare; `test_retrieval_index_tables_exist` checks them."""
    return not (type_ == "table" and name.startswith(("retrieval_vectors", "retrieval_chunks_")))


def _schema_differences(store: Store) -> list:
    """How the store's tables differ from those `tables.py` declares."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": _not_virtual})
        return compare_metadata(context, _declared_schema(conn.dialect.name))


def test_migrations_create_exactly_the_declared_schema(store):
    assert _schema_differences(store) == []
    Store(store.url).close()  # opening again finds the schema current


def test_conversations_belong_to_their_owner(store):
    repo = store.repo
    repo.create_conversation("alice", "conv_a", 100, {"topic": "x"}, [_message("msg_1", "hi")])
    assert repo.get_conversation("alice", "conv_a").metadata == {"topic": "x"}
    assert repo.get_conversation("bob", "conv_a") is None
    assert repo.list_conversation_items("bob", "conv_a", Page()) is None
    assert repo.get_conversation_item("bob", "conv_a", "msg_1") is None
    assert not repo.add_conversation_items("bob", "conv_a", 101, [_message("msg_2", "x")])
    assert not repo.delete_conversation("bob", "conv_a")
    assert repo.update_conversation("alice", "conv_a", {"topic": "y"}).metadata == {"topic": "y"}
    assert [i["id"] for i in repo.list_conversation_items("alice", "conv_a", Page()).items] == [
        "msg_1"
    ]


def test_an_item_is_found_by_its_id_for_its_owner_only(store):
    """`find_item` (an item_reference's lookup) reads a response's input and output items
    and a conversation's, each its owner's only."""
    repo = store.repo
    repo.create_conversation("alice", "conv_a", 100, {}, [_message("msg_c", "kept")])
    _record(repo, "alice", "resp_1", None, "asked")
    assert repo.find_item("alice", "msg_c")["content"][0]["text"] == "kept"
    assert repo.find_item("alice", "msg_in_resp_1")["content"][0]["text"] == "asked"
    assert repo.find_item("alice", "msg_out_resp_1")["role"] == "assistant"
    for owner, item_id in (("bob", "msg_c"), ("bob", "msg_out_resp_1"), ("alice", "msg_x")):
        assert repo.find_item(owner, item_id) is None


def test_pages_follow_the_cursor_in_either_order(store):
    repo = store.repo
    ids = [f"msg_{i}" for i in range(7)]
    repo.create_conversation("alice", "conv_p", 1, {}, [_message(i, i) for i in ids])

    def walk(order: str) -> list[str]:
        seen, after = [], None
        while True:
            page = repo.list_conversation_items("alice", "conv_p", Page(3, after, order))
            seen += [i["id"] for i in page.items]
            if not page.has_more:
                return seen
            after = page.items[-1]["id"]

    assert walk("asc") == ids
    assert walk("desc") == ids[::-1]

    def back(order: str) -> list[list[str]]:
        """From the list's end, pages taken with `before` (the previous page each time)."""
        last = ids[-1] if order == "asc" else ids[0]
        pages, before = [], last
        while True:
            page = repo.list_conversation_items(
                "alice", "conv_p", Page(3, order=order, before=before)
            )
            pages.append([i["id"] for i in page.items])
            if not page.has_more:
                return pages
            before = page.items[0]["id"]

    # each page in the list's order, the pages from the cursor back to the start
    assert back("asc") == [["msg_3", "msg_4", "msg_5"], ["msg_0", "msg_1", "msg_2"]]
    assert back("desc") == [["msg_3", "msg_2", "msg_1"], ["msg_6", "msg_5", "msg_4"]]


def test_conversations_page_backwards_with_before(store):
    repo = store.repo
    for i in range(5):
        repo.create_conversation("alice", f"conv_{i}", 100 + i, {}, [])
    rows, more = repo.list_conversations("alice", Page(2, order="desc", before="conv_1"))
    assert ([r.id for r in rows], more) == (["conv_3", "conv_2"], True)
    rows, more = repo.list_conversations("alice", Page(2, order="desc", before="conv_3"))
    assert ([r.id for r in rows], more) == (["conv_4"], False)
    with pytest.raises(NotFoundError) as missing:
        repo.list_conversations("alice", Page(2, before="conv_nope"))
    assert missing.value.param == "before"


def test_a_cursor_not_in_the_list_is_not_found_not_an_empty_page(store):
    """A client paging on after an id that never named an item of the list (made up,
    another list's) must be told, not shown the end of the list: the items after it would
    be silently lost."""
    repo = store.repo
    repo.create_conversation("alice", "conv_c", 1, {}, [_message(f"m_{i}", i) for i in range(3)])
    repo.create_conversation("alice", "conv_other", 1, {}, [_message("m_x", 0)])
    _record(repo, "alice", "resp_c", None, "one")
    for page in (Page(2, after="m_gone"), Page(2, before="m_gone"), Page(2, after="m_x")):
        with pytest.raises(NotFoundError) as missing:
            repo.list_conversation_items("alice", "conv_c", page)
        assert missing.value.param == ("before" if page.before else "after")
    with pytest.raises(NotFoundError):
        repo.list_input_items("alice", "resp_c", Page(2, after="m_gone"))
    assert [
        i["id"]
        for i in repo.list_conversation_items(
            "alice", "conv_c", Page(2, after="m_0", order="asc")
        ).items
    ] == ["m_1", "m_2"]


def test_history_follows_the_branch_it_ends_on(store):
    repo = store.repo
    _record(repo, "alice", "resp_1", None, "one")
    _record(repo, "alice", "resp_2", "resp_1", "two", tokens=[7, 8, 70000], start="msg_in_resp_2")
    _record(repo, "alice", "resp_2b", "resp_1", "two again")
    status, history = repo.response_history("alice", "resp_2")
    assert status == "completed"
    assert [i["id"] for i in history.items] == [
        "msg_in_resp_1",
        "msg_out_resp_1",
        "msg_in_resp_2",
        "msg_out_resp_2",
    ]
    assert (history.context_tokens, history.start) == ([7, 8, 70000], 2)
    _, branch = repo.response_history("alice", "resp_2b")
    assert branch.start == 0  # where its prompt started: the whole history
    assert [i["content"][0]["text"] for i in branch.items] == [
        "one",
        "ONE",
        "two again",
        "TWO AGAIN",
    ]
    assert repo.response_history("bob", "resp_2") is None


def test_a_response_in_a_conversation_appends_its_items(store):
    repo = store.repo
    repo.create_conversation("alice", "conv_c", 1, {}, [_message("msg_0", "zero")])
    _record(
        repo,
        "alice",
        "resp_c",
        None,
        "one",
        conversation="conv_c",
        tokens=[5, 6],
        start="msg_in_resp_c",
    )
    history = repo.conversation_history("alice", "conv_c")
    assert [i["id"] for i in history.items] == ["msg_0", "msg_in_resp_c", "msg_out_resp_c"]
    assert (history.context_tokens, history.start) == ([5, 6], 1)
    assert repo.conversation_history("bob", "conv_c") is None


def _started_at(history) -> str | None:
    """The id of the item the history's last prompt started at (None: the whole history)."""
    return history.items[history.start]["id"] if history.start else None


def test_a_conversations_history_start_stays_on_its_item_as_items_come_and_go(store):
    """Deleting items before the start of the last prompt's history, or adding items
    after it, leaves that start on the same item; deleting the item itself takes its
    prompt's prefix with it: the whole history, truncated anew."""
    repo = store.repo
    repo.create_conversation(
        "alice", "conv_s", 1, {}, [_message(f"msg_{i}", str(i)) for i in range(3)]
    )
    _record(repo, "alice", "resp_s", None, "one", conversation="conv_s", start="msg_2")

    def started_at() -> str | None:
        return _started_at(repo.conversation_history("alice", "conv_s"))

    assert started_at() == "msg_2"
    assert repo.delete_conversation_item("alice", "conv_s", "msg_0")
    assert repo.add_conversation_items("alice", "conv_s", 2, [_message("msg_later", "later")])
    assert started_at() == "msg_2"
    assert repo.delete_conversation_item("alice", "conv_s", "msg_2")
    assert started_at() is None


def test_a_chains_history_start_stays_on_its_item_when_responses_are_deleted(store):
    """Deleting a response of the chain before the start of the last prompt's history
    leaves that start on the same item; deleting the response it started in leaves
    only items that prompt kept: the whole history."""
    repo = store.repo
    for n in range(1, 4):
        previous = f"resp_{n - 1}" if n > 1 else None
        _record(repo, "alice", f"resp_{n}", previous, str(n))
    _record(repo, "alice", "resp_4", "resp_3", "4", start="msg_in_resp_3")
    assert _started_at(repo.response_history("alice", "resp_4")[1]) == "msg_in_resp_3"
    assert repo.delete_response("alice", "resp_1")
    assert _started_at(repo.response_history("alice", "resp_4")[1]) == "msg_in_resp_3"
    assert repo.delete_response("alice", "resp_3")
    _, history = repo.response_history("alice", "resp_4")
    assert ([i["id"] for i in history.items], history.start) == (
        ["msg_in_resp_4", "msg_out_resp_4"],
        0,
    )


def test_a_chain_from_a_conversations_response_starts_with_what_it_saw(store):
    """previous_response_id continues from everything that response had in context: the
    conversation's items before it, not the items appended after it."""
    repo = store.repo
    repo.create_conversation("alice", "conv_h", 1, {}, [_message("msg_0", "zero")])
    _record(repo, "alice", "resp_h1", None, "one", conversation="conv_h")
    _record(repo, "alice", "resp_h2", None, "two", conversation="conv_h")
    _record(repo, "alice", "resp_h3", None, "three", conversation="conv_h")
    _record(repo, "alice", "resp_h4", "resp_h2", "four")

    def chain(response_id: str) -> list[str]:
        return [i["id"] for i in repo.response_history("alice", response_id)[1].items]

    own = [f"msg_{kind}_resp_h{n}" for n in (1, 2, 4) for kind in ("in", "out")]
    assert chain("resp_h4") == ["msg_0", *own]
    repo.delete_conversation_item("alice", "conv_h", "msg_in_resp_h1")
    assert chain("resp_h2") == ["msg_0", *own[1:4]]


def test_a_chain_from_a_conversations_response_keeps_its_place_when_its_items_are_deleted(
    store,
):
    """previous_response_id to a response whose own items were deleted from its
    conversation still starts with the conversation's items before it (those not deleted),
    then its own stored input and output; an item added to the conversation afterwards
    never joins it, even where it is given the seq a deleted item had."""
    repo = store.repo
    repo.create_conversation("alice", "conv_k", 1, {}, [_message("msg_0", "zero")])
    _record(repo, "alice", "resp_k1", None, "one", conversation="conv_k")
    _record(repo, "alice", "resp_k2", None, "two", conversation="conv_k")
    for item_id in ("msg_out_resp_k1", "msg_in_resp_k2", "msg_out_resp_k2"):
        assert repo.delete_conversation_item("alice", "conv_k", item_id)
    assert repo.add_conversation_items("alice", "conv_k", 2, [_message("msg_later", "later")])
    _, history = repo.response_history("alice", "resp_k2")
    assert [i["id"] for i in history.items] == [
        "msg_0",
        "msg_in_resp_k1",
        "msg_in_resp_k2",
        "msg_out_resp_k2",
    ]


def test_deleting_removes_the_rows(store):
    repo = store.repo
    repo.create_conversation("alice", "conv_d", 1, {}, [_message("msg_0", "zero")])
    _record(repo, "alice", "resp_d", None, "one", conversation="conv_d")
    assert _count(store, response_items, response_id="resp_d") == 2
    assert _count(store, conversation_items, conversation_id="conv_d") == 3

    assert repo.delete_response("alice", "resp_d")
    assert _count(store, responses, id="resp_d") == 0
    assert _count(store, response_items, response_id="resp_d") == 0
    assert _count(store, conversation_items, conversation_id="conv_d") == 3  # its own copies

    assert repo.delete_conversation_item("alice", "conv_d", "msg_0")
    assert _count(store, conversation_items, conversation_id="conv_d") == 2
    assert repo.delete_conversation("alice", "conv_d")
    assert _count(store, conversation_items, conversation_id="conv_d") == 0
    assert repo.get_response("alice", "resp_d") is None


def test_calls_run_on_the_store_thread_not_the_event_loop(store):
    def where(repo: Repository) -> str:
        return threading.current_thread().name

    async def main() -> str:
        return await store.call(where)

    assert asyncio.run(main()).startswith("tokenmill-store")
    assert threading.current_thread().name == "MainThread"


def test_key_lookups_do_not_wait_behind_the_writes(store):
    """A request's key lookup runs while the store's worker thread is busy writing."""
    from orchestrator.store import accounts as db

    writing, done = threading.Event(), threading.Event()

    def slow_write(repo: Repository) -> None:
        writing.set()
        assert done.wait(30), "the lookup never finished"

    async def main() -> tuple[bool, bool]:
        write = asyncio.ensure_future(store.call(slow_write))
        await asyncio.to_thread(writing.wait, 30)
        try:
            found = await asyncio.wait_for(store.lookup(db.any_keys), 10)
            still_writing = not write.done()
        finally:
            done.set()
        await write
        return found, still_writing

    assert asyncio.run(main()) == (False, True)


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


def test_serve_stores_in_the_data_dir_unless_given_a_database_url(tmp_path):
    from engine.serve import build_parser, database_url

    folder = tmp_path / "new" / "data"
    url = database_url(build_parser().parse_args(["--data-dir", str(folder)]))
    assert url == f"sqlite:///{folder / 'tokenmill.db'}" and folder.is_dir()
    given = "postgresql+psycopg://u@/db?host=/tmp"
    assert database_url(build_parser().parse_args(["--database-url", given])) == given


def test_responses_cut_off_by_a_crash_are_marked_incomplete(store):
    repo = store.repo
    _record(repo, "alice", "resp_done", None, "one")
    repo.begin_response(
        "alice",
        {
            "id": "resp_cut",
            "created_at": 1.0,
            "status": "in_progress",
            "previous_response_id": None,
            "conversation": None,
            "output": [],
        },
        [],
    )
    assert repo.interrupt_unfinished() == 1
    cut = repo.get_response("alice", "resp_cut")
    assert (cut["status"], cut["incomplete_details"]) == ("incomplete", None)
    assert cut["error"]["code"] == "server_error"
    assert cut["error"]["message"].startswith("the server stopped before this response finished")
    assert repo.get_response("alice", "resp_done")["status"] == "completed"


def test_a_response_read_during_a_checkpoint_never_has_output_without_its_usage(store):
    """A checkpoint commits output and usage together; a read racing it (from another
    server's GET, say) may see the older or the newer state, never output newer than the
    usage it came with. The checkpoint here lands right after the read's first statement."""
    repo = store.repo
    body = {
        "id": "resp_race",
        "created_at": 1.0,
        "status": "in_progress",
        "previous_response_id": None,
        "conversation": None,
        "output": [],
    }
    repo.begin_response("alice", body, [_message("msg_in_race", "one")])
    partial = {**_message("msg_out_race", "Half"), "role": "assistant", "status": "in_progress"}
    so_far = {"input_tokens": 9, "output_tokens": 1, "total_tokens": 10}
    statements: list[str] = []

    def checkpoint_after_first_statement(*_args) -> None:
        statements.append("read")
        if len(statements) == 1:  # the checkpoint's own statements come after this one
            repo.checkpoint_response("alice", "resp_race", [partial], so_far)

    event.listen(store.engine, "after_cursor_execute", checkpoint_after_first_statement)
    try:
        stored = repo.get_response("alice", "resp_race")
    finally:
        event.remove(store.engine, "after_cursor_execute", checkpoint_after_first_statement)
    assert stored["output"] == [] or stored["usage"] == so_far, stored


def test_a_turn_cut_off_by_a_crash_keeps_what_it_checkpointed(store):
    """Its user message and the output it had checkpointed stay in the response and in
    the history the next turn reads, after the turns before."""
    repo = store.repo
    repo.create_conversation("alice", "conv_k", 1, {}, [_message("msg_0", "zero")])
    _record(repo, "alice", "resp_1", None, "one", conversation="conv_k")
    body = {
        "id": "resp_cut",
        "created_at": 2.0,
        "status": "in_progress",
        "previous_response_id": None,
        "conversation": {"id": "conv_k"},
        "output": [],
    }
    repo.begin_response("alice", body, [_message("msg_in_cut", "two")])
    partial = {**_message("msg_out_cut", "Half an ans"), "role": "assistant"}
    so_far = {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}
    repo.checkpoint_response("alice", "resp_cut", [{**partial, "status": "in_progress"}], so_far)
    assert repo.interrupt_unfinished() == 1
    assert repo.get_response("alice", "resp_cut")["usage"] == so_far  # as last checkpointed
    history = repo.conversation_history("alice", "conv_k")
    assert [item["id"] for item in history.items] == [
        "msg_0",
        "msg_in_resp_1",
        "msg_out_resp_1",
        "msg_in_cut",
        "msg_out_cut",
    ]
    assert history.items[-1]["status"] == "incomplete"
    assert repo.get_response("alice", "resp_cut")["output"] == [{**partial, "status": "incomplete"}]
    assert history.context_tokens is None  # the cut turn's tokens were never recorded


def test_retrieval_index_tables_exist_on_sqlite_only(store):
    names = set(inspect(store.engine).get_table_names())
    assert {"files", "vector_stores", "vector_store_files"} <= names
    index = {"retrieval_chunks", "retrieval_vectors", "retrieval_chunks_fts"}
    if store.engine.dialect.name == "sqlite":
        assert index <= names
    else:
        assert not index & names


def test_a_schema_newer_than_the_code_is_refused_with_a_message(database_url):
    """A database a newer tokenmill wrote: an error that says so, not Alembic's traceback
    (the server and the admin CLI print ValueErrors as one line)."""
    store = Store(database_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    store.close()
    with pytest.raises(SchemaTooNewError, match="newer version"):
        Store(database_url)


def test_servers_starting_together_on_a_new_database_all_open_it(postgres):
    """Servers of a deployment start at once on an empty PostgreSQL database: one migrates
    it and the others wait for it, instead of failing on the tables it is creating."""
    url = postgres.create_database()
    start = threading.Barrier(4)
    opened: list[Store] = []
    failed: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            opened.append(Store(url))
        except BaseException as exc:
            failed.append(exc)

    _run_together([open_store] * 4)
    for store in opened:
        store.close()
    assert failed == []
    assert len(opened) == 4


def test_one_server_holds_a_data_directory(tmp_path):
    """A second server on the same SQLite data directory would mark the first one's
    running responses incomplete as it starts: it is refused until the first lets go."""
    held = hold_data_dir(tmp_path)
    with pytest.raises(
        ValueError, match=rf"in use by another tokenmill server \(pid {os.getpid()}\)"
    ):
        hold_data_dir(tmp_path)
    held.close()
    hold_data_dir(tmp_path).close()


def test_a_sqlite_file_is_held_by_one_server_and_postgresql_by_none(tmp_path):
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    held = hold_database(url)
    with pytest.raises(ValueError, match=r"the database .*shop\.db is in use by another"):
        hold_database(url.replace("sqlite://", "sqlite+pysqlite://"))
    held.close()
    hold_database(url).close()
    assert hold_database("sqlite://") is None  # in memory: nobody else can open it
    assert hold_database("postgresql+psycopg://u@localhost/db") is None  # shared by design
    with pytest.raises(ValueError, match="cannot lock the database"):
        hold_database(f"sqlite:///{tmp_path / 'missing' / 'shop.db'}")


@contextlib.contextmanager
def _at_revision(url: str, revision: str, migrate=command.upgrade) -> Iterator[Connection]:
    """A connection to a store migrated only to `revision` (or back to it, `migrate`
    command.downgrade), as an older version left it, to fill with that version's rows
    (committed on exit)."""
    engine = create_db_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            migrate(config, revision)
            yield conn
    finally:
        engine.dispose()


def test_upgrading_a_store_with_files_records_each_files_size(database_url):
    """Revision 0007 adds `files.bytes` (what storage quotas sum): files stored before it
    get their blob's size."""
    with _at_revision(database_url, "0006") as conn:
        conn.execute(
            text(
                "INSERT INTO files (id, owner_id, purpose, body) "
                "VALUES ('file_old', 'user_a', 'assistants', '{}')"
            )
        )
        conn.execute(
            text("INSERT INTO file_blobs (file_id, data) VALUES ('file_old', :data)"),
            {"data": b"\x00" * 1234},
        )
    store = Store(database_url)
    try:
        assert kb.storage_used(store.repo, "user_a", 0) == 1234
    finally:
        store.close()


def test_upgrading_a_store_with_vector_stores_keeps_when_each_was_last_active(database_url):
    """Revision 0009 moves `last_active_at` (what expiry counts from) into a column:
    stores made before it keep the time their body held, or their creation time."""
    with _at_revision(database_url, "0008") as conn:
        for store_id, body in (
            ("vs_used", '{"id": "vs_used", "created_at": 100, "last_active_at": 250}'),
            ("vs_new", '{"id": "vs_new", "created_at": 300}'),
        ):
            conn.execute(
                text("INSERT INTO vector_stores (id, owner_id, body) VALUES (:id, 'a', :body)"),
                {"id": store_id, "body": body},
            )
    store = Store(database_url)
    try:
        found = {s: kb.get_vector_store(store.repo, "a", s)[0] for s in ("vs_used", "vs_new")}
    finally:
        store.close()
    assert {s: (b["last_active_at"], b["expires_after"]) for s, b in found.items()} == {
        "vs_used": (250, None),
        "vs_new": (300, None),
    }


def test_upgrading_a_store_keeps_the_place_of_each_conversations_response(database_url):
    """Revision 0011 records where each response sits in its conversation: from its items
    still there, so a chain from it keeps the conversation's earlier items once they are
    deleted; one whose items were all deleted before it starts with its own items. Seqs
    of deleted items are not given again (on SQLite, the table is rebuilt AUTOINCREMENT)."""
    in_conversation = ["msg_0", "msg_in_resp_kept", "msg_out_resp_kept"]
    in_responses = [
        ("msg_in_resp_kept", "resp_kept"),
        ("msg_out_resp_kept", "resp_kept"),
        ("msg_in_resp_gone", "resp_gone"),  # deleted from the conversation already
    ]
    with _at_revision(database_url, "0010") as conn:
        conn.execute(
            text(
                "INSERT INTO conversations (id, owner_id, created_at, meta) "
                "VALUES ('conv_u', 'alice', 1, '{}')"
            )
        )
        for response_id in ("resp_kept", "resp_gone"):
            conn.execute(
                text(
                    "INSERT INTO responses (id, owner_id, created_at, status, "
                    "conversation_id, body) VALUES (:id, 'alice', 1, 'completed', 'conv_u', '{}')"
                ),
                {"id": response_id},
            )
        for item_id in in_conversation:
            conn.execute(
                text(
                    "INSERT INTO conversation_items (id, conversation_id, owner_id, "
                    "created_at, body) VALUES (:id, 'conv_u', 'alice', 1, :body)"
                ),
                {"id": item_id, "body": f'{{"id": "{item_id}"}}'},
            )
        for item_id, response_id in in_responses:
            conn.execute(
                text(
                    "INSERT INTO response_items (id, response_id, owner_id, kind, body) "
                    "VALUES (:id, :response, 'alice', 'input', :body)"
                ),
                {"id": item_id, "response": response_id, "body": f'{{"id": "{item_id}"}}'},
            )
    store = Store(database_url)
    try:
        repo = store.repo

        def chain(response_id: str) -> list[str]:
            return [i["id"] for i in repo.response_history("alice", response_id)[1].items]

        for item_id in ("msg_in_resp_kept", "msg_out_resp_kept"):
            assert repo.delete_conversation_item("alice", "conv_u", item_id)
        assert chain("resp_kept") == ["msg_0", "msg_in_resp_kept", "msg_out_resp_kept"]
        assert chain("resp_gone") == ["msg_in_resp_gone"]
        assert repo.delete_conversation_item("alice", "conv_u", "msg_0")
        assert repo.add_conversation_items("alice", "conv_u", 2, [_message("msg_new", "new")])
        assert chain("resp_kept") == ["msg_in_resp_kept", "msg_out_resp_kept"]
    finally:
        store.close()


def test_upgrading_a_store_never_gives_a_deleted_objects_place_again(database_url):
    """Revision 0020 rebuilds files, vector stores and a vector store's files (on SQLite:
    AUTOINCREMENT), keeping every row and the rows that reference them (a file's bytes, a
    store's files), and their seqs go on past the places the tombstones of the objects
    deleted before it hold: the page after the deleted newest object of each list, in
    `asc` order, holds the object made next."""
    with _at_revision(database_url, "0019") as conn:
        for i in range(3):
            body = {"id": f"file_{i}"}
            conn.execute(
                insert(files).values(owner_id="alice", purpose="user_data", body=body, **body)
            )
            conn.execute(insert(file_blobs).values(file_id=f"file_{i}", data=b"abc"))
        for store_id in ("vs_0", "vs_1"):
            body = {"id": store_id}
            conn.execute(insert(vector_stores).values(owner_id="alice", body=body, **body))
        for file_id in ("file_0", "file_1"):
            body = {**_store_file_body(file_id), "status": "completed"}
            values = {"vector_store_id": "vs_0", "owner_id": "alice", "status": "completed"}
            conn.execute(insert(vector_store_files).values(id=file_id, body=body, **values))
        # the newest object of each list deleted, as the code before 0020 did
        for table, parent, parent_id, gone in (
            (files, files.c.owner_id, "alice", "file_2"),
            (vector_stores, vector_stores.c.owner_id, "alice", "vs_1"),
            (vector_store_files, vector_store_files.c.vector_store_id, "vs_0", "file_1"),
        ):
            assert repository.delete_listed(
                conn, table, parent, parent_id, "alice", table.c.id == gone
            )
    store = Store(database_url)
    try:
        repo, now = store.repo, int(time.time())
        assert [kb.file_content(repo, "alice", f"file_{i}", now)[2] for i in (0, 1)] == [b"abc"] * 2
        assert kb.get_store_file(repo, "alice", "vs_0", "file_0")["status"] == "completed"
        body = {"id": "file_new", "purpose": "user_data", "created_at": now, "expires_at": None}
        kb.add_file(repo, "alice", body, None, b"")
        kb.add_vector_store(repo, "alice", _vector_store_body("vs_new"), [])
        assert kb.add_store_files(repo, "alice", "vs_0", [_store_file_body("file_new")])
        pages = (
            kb.list_files(repo, "alice", Page(after="file_2", order="asc"), None, now),
            kb.list_vector_stores(repo, "alice", Page(after="vs_1", order="asc"))[0],
            kb.list_store_files(repo, "alice", "vs_0", Page(after="file_1", order="asc"), None),
        )
        assert [_ids(page) for page in pages] == [
            (["file_new"], False),
            (["vs_new"], False),
            (["file_new"], False),
        ]
    finally:
        store.close()


def test_upgrading_a_store_reads_its_responses_prompts_as_starting_at_the_history(database_url):
    """Revision 0013 adds where each response's prompt started its history; the responses
    recorded before have none, read as the whole history (as their next turn read it), and
    their prompt tokens are extended as before."""
    with _at_revision(database_url, "0012") as conn:
        conn.execute(
            responses.insert().values(
                id="resp_old",
                owner_id="alice",
                created_at=1,
                status="completed",
                body={},
                context_tokens=pack_tokens([4, 5, 6]),
            )
        )
    store = Store(database_url)
    try:
        _, history = store.repo.response_history("alice", "resp_old")
        assert (history.context_tokens, history.start) == ([4, 5, 6], 0)
    finally:
        store.close()


def test_upgrading_past_0014_keeps_the_starts_counted_before_and_downgrading_drops_ids(
    database_url,
):
    """Revision 0014 records where a prompt's history started as an item's id; a response
    recorded before keeps its count, read as before. Back at 0013, the responses recorded
    since have no count: the whole history, as their next turn then reads it."""
    with _at_revision(database_url, "0013") as conn:
        conn.execute(
            responses.insert().values(
                id="resp_old", owner_id="alice", created_at=1, status="completed", body={}
            )
        )
        conn.execute(
            response_items.insert(),
            [
                {"id": f"msg_{i}", "response_id": "resp_old", "owner_id": "alice"}
                | {"kind": "input", "body": _message(f"msg_{i}", str(i))}
                for i in range(3)
            ],
        )
        conn.execute(text("UPDATE responses SET history_start = 2 WHERE id = 'resp_old'"))
    store = Store(database_url)
    try:
        repo = store.repo
        assert _started_at(repo.response_history("alice", "resp_old")[1]) == "msg_2"
        _record(repo, "alice", "resp_new", "resp_old", "new", start="msg_in_resp_new")
        assert _started_at(repo.response_history("alice", "resp_new")[1]) == "msg_in_resp_new"
    finally:
        store.close()
    with _at_revision(database_url, "0013", migrate=command.downgrade) as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("responses")}
        assert "history_start" in columns and "history_start_item" not in columns
        counts = text("SELECT id, history_start FROM responses ORDER BY id")
        assert conn.execute(counts).all() == [("resp_new", None), ("resp_old", 2)]


def test_a_page_of_vector_stores_reads_their_rows_once(store):
    """The page's bodies and the expiry kept in columns of their own come in one statement."""
    for store_id, expires_after in (
        ("vs_a", None),
        ("vs_b", {"anchor": "last_active_at", "days": 2}),
    ):
        body = {"id": store_id, "created_at": 100, "last_active_at": 200}
        kb.add_vector_store(store.repo, "a", body | {"expires_after": expires_after}, [])
    reads: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if "FROM vector_stores" in statement:
            reads.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        page, _counts = kb.list_vector_stores(store.repo, "a", Page(order="asc"))
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    assert len(reads) == 1, reads
    assert [(s["id"], s["last_active_at"], s["expires_after"]) for s in page.items] == [
        ("vs_a", 200, None),
        ("vs_b", 200, {"anchor": "last_active_at", "days": 2}),
    ]


def test_bad_data_directories_and_database_urls_are_clear_one_line_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        sqlite_url(a_file)
    with pytest.raises(ValueError, match="cannot create the data directory"):
        hold_data_dir(a_file / "below")
    with pytest.raises(ValueError, match="SQLite or PostgreSQL, not 'mysql'"):
        Store("mysql://x@127.0.0.1:1/x")
    with pytest.raises(SQLAlchemyError) as refused:
        Store("postgresql+psycopg://nobody@127.0.0.1:1/x")
    message = database_error(refused.value)
    assert "\n" not in message and "sqlalche.me" not in message and "127.0.0.1" in message


VECTOR = bytes(range(256)) * 6  # 384 float32s


def _older_vector_index(url: str) -> None:
    """A store at revision 0007 whose `vec0` table has sqlite-vec's default chunk (1,024
    vectors), as the older code made it, holding one vector in each of two stores."""
    with _at_revision(url, "0007") as conn:
        conn.exec_driver_sql("DROP TABLE retrieval_vectors")
        conn.exec_driver_sql(vectors_ddl(384).replace(f", chunk_size={VECTOR_CHUNK}", ""))
        for i, store_id in enumerate(("vs_a", "vs_b"), start=1):
            conn.execute(
                text(
                    "INSERT INTO retrieval_vectors (id, vector_store_id, owner_id, embedding) "
                    "VALUES (:id, :store, 'user_a', :vector)"
                ),
                {"id": i, "store": store_id, "vector": VECTOR},
            )


def _kept_vectors(store: Store) -> list[tuple]:
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT id, vector_store_id, embedding FROM retrieval_vectors ORDER BY id"
        ).all()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def test_vectors_are_stored_in_small_chunks_and_an_older_index_is_rebuilt_so(tmp_path):
    """Revision 0008 rebuilds a `vec0` table made with sqlite-vec's default chunk (1,024
    vectors: 1.5 MB for any store holding a vector) in chunks of VECTOR_CHUNK, keeping
    every vector and what a search finds, and the file gives the freed pages back."""
    path = tmp_path / "tokenmill.db"
    url = f"sqlite:///{path}"
    _older_vector_index(url)
    old_bytes = path.stat().st_size
    store = Store(url)
    try:
        kept = _kept_vectors(store)
        with store.engine.connect() as conn:
            free_pages = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            chunks = conn.exec_driver_sql(
                "SELECT length(vectors) FROM retrieval_vectors_vector_chunks00"
            ).all()
            found = conn.exec_driver_sql(
                "SELECT id FROM retrieval_vectors WHERE embedding MATCH ? AND k = 5 "
                "AND vector_store_id = 'vs_b'",
                (VECTOR,),
            ).all()
    finally:
        store.close()
    assert kept == [(1, "vs_a", VECTOR), (2, "vs_b", VECTOR)]
    assert chunks == [(VECTOR_CHUNK * 384 * 4,)] * 2  # one small chunk per store
    assert found == [(2,)]
    assert old_bytes > 3_000_000  # two default chunks
    assert free_pages == 0 and path.stat().st_size < old_bytes / 4


def test_a_vacuum_that_fails_after_an_upgrade_leaves_the_store_working(tmp_path, monkeypatch):
    """The VACUUM after an upgrade is best effort: refused (another process reading the
    file, no disk for its copy), the server starts with the pages left free."""
    url = f"sqlite:///{tmp_path / 'tokenmill.db'}"
    _older_vector_index(url)
    make_engine = store_module._create_engine

    def refusing_vacuum(url: str):
        engine = make_engine(url)

        def refuse(_conn, _cursor, statement, *_args) -> None:
            if statement.strip().upper() == "VACUUM":
                raise engine.dialect.loaded_dbapi.OperationalError("database is locked")

        event.listen(engine, "before_cursor_execute", refuse)
        return engine

    monkeypatch.setattr(store_module, "_create_engine", refusing_vacuum)
    store = Store(url)
    try:
        assert _kept_vectors(store) == [(1, "vs_a", VECTOR), (2, "vs_b", VECTOR)]
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA freelist_count").scalar_one() > 0
    finally:
        store.close()


# The text index as the versions before revision 0012 made it: the raw text, so a CJK
# sentence was one token.
_RAW_TEXT_FTS = (
    "CREATE VIRTUAL TABLE retrieval_chunks_fts USING fts5("
    "text, content='retrieval_chunks', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER retrieval_chunks_ai AFTER INSERT ON retrieval_chunks BEGIN "
    "INSERT INTO retrieval_chunks_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER retrieval_chunks_ad AFTER DELETE ON retrieval_chunks BEGIN "
    "INSERT INTO retrieval_chunks_fts(retrieval_chunks_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
)
_GENERATED_TSV_TABLE = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    "CREATE TABLE retrieval_chunks ("
    "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "owner_id VARCHAR(64) NOT NULL, vector_store_id VARCHAR(64) NOT NULL, "
    "file_id VARCHAR(64) NOT NULL, filename TEXT NOT NULL, chunk_index INTEGER NOT NULL, "
    "text TEXT NOT NULL, attributes JSONB NOT NULL, embedding vector(384) NOT NULL, "
    "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED, "
    "tsv_length INTEGER GENERATED ALWAYS AS (length(to_tsvector('english', text))) STORED)",
    "CREATE INDEX ix_retrieval_chunks_tsv ON retrieval_chunks USING gin (tsv)",
)
_OLD_CHUNKS = {
    "file_zh": "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "file_ja": "富士山は日本で最も高い山です。",
    "file_en": "A small kitten naps on the rug.",
}


def _older_text_index(url: str) -> None:
    """A store at revision 0011 whose text index holds each chunk's raw text, as the older
    code made it (on PostgreSQL: its generated `tsv`), with a Chinese, a Japanese and an
    English chunk."""
    with _at_revision(url, "0011") as conn:
        if conn.dialect.name == "sqlite":
            for trigger in ("retrieval_chunks_ai", "retrieval_chunks_ad", "retrieval_chunks_au"):
                conn.exec_driver_sql(f"DROP TRIGGER {trigger}")
            conn.exec_driver_sql("DROP TABLE retrieval_chunks_fts")
            statements = _RAW_TEXT_FTS
        else:
            statements = _GENERATED_TSV_TABLE
        for statement in statements:
            conn.exec_driver_sql(statement)
        for file_id, chunk in _OLD_CHUNKS.items():
            _insert_as_older_code(conn, file_id, chunk)


def _insert_as_older_code(conn: Connection, file_id: str, chunk: str) -> None:
    """A chunk of store `vs_a` (owner `a`) inserted as the code before revision 0012 did:
    its text index written by the database (FTS5 triggers, PostgreSQL's generated `tsv`)."""
    extra = "" if conn.dialect.name == "sqlite" else ", embedding"
    vector = "" if conn.dialect.name == "sqlite" else ", CAST(:vector AS vector)"
    attributes = "'{}'" if conn.dialect.name == "sqlite" else "CAST('{}' AS jsonb)"
    conn.execute(
        text(
            "INSERT INTO retrieval_chunks (owner_id, vector_store_id, file_id, "
            f"filename, chunk_index, text, attributes{extra}) VALUES ('a', 'vs_a', "
            f":file_id, 'f.txt', 0, :text, {attributes}{vector})"
        ),
        {"file_id": file_id, "text": chunk, "vector": str([0.05] * 384)},
    )


def _found_by_text(store: Store, query: str) -> list[str]:
    """The files of store `vs_a` (owner `a`) whose chunks a text search for `query` finds."""
    request = SearchRequest(("vs_a",), query, np.zeros(384, np.float32), mode="text")
    return sorted(h.file_id for h in kb.search(store.repo, "a", request, 0))


def test_upgrading_a_store_finds_cjk_words_in_chunks_indexed_before(database_url):
    """Chunks indexed before CJK became two-character terms are indexed again when the
    store is upgraded (SQLite: revision 0012; PostgreSQL: when the index is prepared), so
    a word inside a sentence is found; English is found as before."""
    _older_text_index(database_url)
    store = Store(database_url)
    try:
        assert kb.prepare_index(store.repo) is None
        assert [_found_by_text(store, q) for q in ("首都", "日本", "kittens")] == [
            ["file_zh"],
            ["file_ja"],
            ["file_en"],
        ]
        with store.engine.begin() as conn:
            assert kb.index_for(store.repo).delete_file(conn, "a", "vs_a", "file_zh") == 1
        assert _found_by_text(store, "首都") == []
    finally:
        store.close()


def test_servers_starting_together_upgrade_an_older_index_once(postgres, monkeypatch):
    """Two servers start at once on a database whose PostgreSQL index an older version
    made: both get the index, one after the other, rather than one deadlocking with the
    other on the table's locks and serving no vector stores. The first to reach the
    upgrade waits for the other to reach it too (then they run it together) or to be
    seen waiting for the migrations' lock (then they take turns), 3 s at most."""
    url = postgres.create_database()
    _older_text_index(url)
    upgrade = pg_index._upgrade_keywords
    arrived: list[Connection] = []
    stores = [Store(url), Store(url)]

    def other_waits_for_the_lock() -> bool:
        with stores[0].engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            )
            return waiting.scalar_one() > 0

    def meet_then_upgrade(conn: Connection) -> None:
        arrived.append(conn)
        deadline = time.monotonic() + 3
        while len(arrived) < 2 and not other_waits_for_the_lock():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        upgrade(conn)

    monkeypatch.setattr(pg_index, "_upgrade_keywords", meet_then_upgrade)
    reasons: list[str | None] = []
    _run_together([lambda s=s: reasons.append(kb.prepare_index(s.repo)) for s in stores])
    for store in stores:
        store.close()
    assert reasons == [None, None]


def test_chunks_an_older_server_stores_after_the_upgrade_are_indexed_at_the_next_start(postgres):
    """A rolling upgrade on PostgreSQL: a server of the older version, still running after
    a new one upgraded the index, stores chunks without a `tsv`. The next new server to
    start writes it from their keyword text, so they are found by text, CJK words too."""
    url = postgres.create_database()
    _older_text_index(url)
    store = Store(url)
    try:
        assert kb.prepare_index(store.repo) is None
        with store.engine.begin() as conn:
            _insert_as_older_code(conn, "file_zh_late", "上海是中国最大的城市。")
            _insert_as_older_code(conn, "file_en_late", "A grey kitten chases the ball.")
        assert _found_by_text(store, "上海") == []
        assert kb.prepare_index(store.repo) is None
        assert _found_by_text(store, "上海") == ["file_zh_late"]
        assert _found_by_text(store, "kittens") == ["file_en", "file_en_late"]
        with store.engine.connect() as conn:
            unindexed = "SELECT count(*) FROM retrieval_chunks WHERE tsv_length IS NULL"
            assert conn.exec_driver_sql(unindexed).scalar_one() == 0
    finally:
        store.close()


_UNNORMALISED_CHUNKS = {
    "file_zh": "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "file_ja": "ﾃﾞｰﾀﾍﾞｰｽの設定を確認します。",  # half-width Katakana
    "file_en": "Error ＸＹ７７: a small kitten naps on the rug.",  # full-width Latin
}


def _bigram_text_index(url: str) -> None:
    """A store at revision 0014 whose chunks' terms are that version's keyword text
    (`cjk_bigrams`: CJK runs as two-character terms only, nothing normalised)."""
    with _at_revision(url, "0014") as conn:
        if conn.dialect.name == "sqlite":  # the older code's triggers call its own function
            conn.connection.driver_connection.create_function("keyword_text", 1, cjk_bigrams)
        else:
            pg_index.PgIndex().create_schema(conn)
        for file_id, chunk in _UNNORMALISED_CHUNKS.items():
            _insert_as_older_code(conn, file_id, chunk)
        if conn.dialect.name != "sqlite":
            conn.execute(
                text(
                    "UPDATE retrieval_chunks SET tsv = to_tsvector('english', :terms), "
                    "tsv_length = length(to_tsvector('english', :terms)) WHERE file_id = :file"
                ),
                [{"file": f, "terms": cjk_bigrams(c)} for f, c in _UNNORMALISED_CHUNKS.items()],
            )


def test_keys_issued_before_key_expiry_never_expire_and_the_downgrade_keeps_the_keys(
    database_url,
):
    """Revision 0016 adds `api_keys.expires_at`: a key issued before it never expires.
    Back at revision 0015 the column is gone (as the older code knows no expiry) and every
    key, with its digest, is kept."""
    with _at_revision(database_url, "0015") as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, name, created_at, quota_period) "
                "VALUES ('user_a', 'alice', 1, 'total')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO api_keys (id, user_id, digest, hint, created_at) "
                "VALUES ('key_old', 'user_a', 'digest_old', 'sk-tm-ab...wxyz', 1)"
            )
        )
    store = Store(database_url)
    try:
        assert accounts.find_key(store.repo, "digest_old")[::2] == ("key_old", None)
        accounts.add_key(
            store.repo, KeyRow("key_new", "user_a", "h", 2, expires_at=9), "digest_new"
        )
        assert [k.expires_at for k in accounts.list_keys(store.repo, "user_a")] == [None, 9]
    finally:
        store.close()
    with _at_revision(database_url, "0015", migrate=command.downgrade) as conn:
        assert "expires_at" not in {c["name"] for c in inspect(conn).get_columns("api_keys")}
        rows = conn.execute(text("SELECT id, digest FROM api_keys ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("key_new", "digest_new"), ("key_old", "digest_old")]
    store = Store(database_url)
    try:  # upgrading again gives the declared table (its unique digest, its index)
        assert _schema_differences(store) == []
        assert accounts.find_key(store.repo, "digest_new")[::2] == ("key_new", None)
    finally:
        store.close()


def test_files_uploaded_before_file_expiry_never_expire_and_the_downgrade_keeps_them(
    database_url,
):
    """Revision 0018 adds `files.expires_at`: a file uploaded before it never expires.
    Back at revision 0017 the column is gone (as the older code knows no expiry) and every
    file, with its bytes, is kept."""
    with _at_revision(database_url, "0017") as conn:
        conn.execute(
            text(
                "INSERT INTO files (id, owner_id, purpose, body, bytes) "
                "VALUES ('file_old', 'user_a', 'assistants', '{}', 3)"
            )
        )
        conn.execute(
            text("INSERT INTO file_blobs (file_id, data) VALUES ('file_old', :data)"),
            {"data": b"abc"},
        )
    store = Store(database_url)
    try:
        assert kb.file_content(store.repo, "user_a", "file_old", 2**62)[2] == b"abc"
        body = {"id": "file_new", "purpose": "assistants", "created_at": 1, "expires_at": 9}
        kb.add_file(store.repo, "user_a", body, None, b"de")
        assert kb.delete_expired_files(store.repo, 2**62, 10) == [("user_a", "file_new")]
        kb.add_file(store.repo, "user_a", body, None, b"de")
    finally:
        store.close()
    with _at_revision(database_url, "0017", migrate=command.downgrade) as conn:
        assert "expires_at" not in {c["name"] for c in inspect(conn).get_columns("files")}
        rows = conn.execute(text("SELECT file_id, data FROM file_blobs ORDER BY file_id")).all()
    assert [(r[0], bytes(r[1])) for r in rows] == [("file_new", b"de"), ("file_old", b"abc")]
    store = Store(database_url)
    try:  # upgrading again gives the declared table (its index)
        assert _schema_differences(store) == []
    finally:
        store.close()


def _code_call(item_id: str, image: str) -> dict:
    """A code_interpreter_call item as a response keeps it, with one image output."""
    return {
        "id": item_id,
        "type": "code_interpreter_call",
        "status": "completed",
        "code": "plot()",
        "container_id": "cntr_1",
        "outputs": [{"type": "logs", "logs": ""}, {"type": "image", "url": image}],
    }


def test_upgrading_a_store_counts_the_images_its_items_keep_in_their_owners_storage(
    database_url,
):
    """Revision 0022 adds `output_bytes` to response and conversation items (what the
    storage quota sums beside the files' bytes): code_interpreter images stored before it
    are counted from the items' bodies, a response's item and its conversation's copy
    once; the downgrade drops the column and the upgrade counts them again."""
    image = "data:image/png;base64," + "A" * 100
    with _at_revision(database_url, "0021") as conn:
        conn.execute(
            text(
                "INSERT INTO responses (id, owner_id, created_at, status, body) "
                "VALUES ('resp_old', 'user_a', 1, 'completed', '{}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO conversations (id, owner_id, created_at, meta) "
                "VALUES ('conv_old', 'user_a', 1, '{}')"
            )
        )
        for item in (_code_call("ci_old", image), _message("msg_old", "hi")):
            body = json.dumps(item)
            conn.execute(
                text(
                    "INSERT INTO response_items (id, response_id, owner_id, kind, body) "
                    "VALUES (:id, 'resp_old', 'user_a', 'output', :body)"
                ),
                {"id": item["id"], "body": body},
            )
            conn.execute(
                text(
                    "INSERT INTO conversation_items (id, conversation_id, owner_id, "
                    "created_at, body) VALUES (:id, 'conv_old', 'user_a', 1, :body)"
                ),
                {"id": item["id"], "body": body},
            )
    for _ in range(2):  # upgraded, then downgraded and upgraded again
        store = Store(database_url)
        try:
            assert kb.storage_used(store.repo, "user_a", 0) == len(image)
            assert _schema_differences(store) == []
            store.repo.delete_response("user_a", "resp_old")
            assert kb.storage_used(store.repo, "user_a", 0) == len(image)  # the copy
        finally:
            store.close()
        with _at_revision(database_url, "0021", migrate=command.downgrade) as conn:
            columns = inspect(conn).get_columns("conversation_items")
            assert "output_bytes" not in {c["name"] for c in columns}


def test_upgrading_a_store_indexes_cjk_characters_and_normalised_text(database_url):
    """Revision 0015 indexes every stored chunk again as `keyword_text` makes it now: a
    one-character query finds the character inside a run, half-width Katakana and
    full-width Latin are found by their usual forms; deleting a chunk takes its terms."""
    _bigram_text_index(database_url)
    store = Store(database_url)
    try:
        assert kb.prepare_index(store.repo) is None
        found = [_found_by_text(store, q) for q in ("都", "データベース", "xy77", "kittens")]
        assert found == [["file_zh"], ["file_ja"], ["file_en"], ["file_en"]]
        with store.engine.begin() as conn:
            assert kb.index_for(store.repo).delete_file(conn, "a", "vs_a", "file_ja") == 1
        assert _found_by_text(store, "データベース") == []
    finally:
        store.close()


def test_downgrading_below_0015_gives_the_older_code_its_own_terms(database_url):
    """Back at revision 0014 every chunk's terms are that version's keyword text again:
    on SQLite the older code's triggers delete a chunk's terms by it (FTS5 removes only
    the terms it is given), on PostgreSQL its queries match the `tsv`."""
    _bigram_text_index(database_url)
    Store(database_url).close()
    with _at_revision(database_url, "0014", migrate=command.downgrade):
        pass
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            _check_older_terms(conn)
    finally:
        engine.dispose()


def _check_older_terms(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.connection.driver_connection.create_function("keyword_text", 1, cjk_bigrams)
        conn.exec_driver_sql("DELETE FROM retrieval_chunks WHERE file_id = 'file_zh'")
        for term in ("北京", "北", "都"):
            assert _count_matches(conn, term) == 0, term
        assert _count_matches(conn, "ﾃﾞ") == 1
    else:
        rows = conn.exec_driver_sql("SELECT text, tsv::text FROM retrieval_chunks").all()
        for chunk, tsv in rows:
            older = "SELECT to_tsvector('english', CAST(:terms AS text))::text"
            assert conn.execute(text(older), {"terms": cjk_bigrams(chunk)}).scalar() == tsv


def _count_matches(conn: Connection, term: str) -> int:
    """How many rows SQLite's text index holds under `term`."""
    return conn.exec_driver_sql(
        f"SELECT count(*) FROM retrieval_chunks_fts WHERE retrieval_chunks_fts MATCH '\"{term}\"'"
    ).scalar_one()


def test_downgrading_below_0012_gives_the_older_code_a_tsv_postgresql_writes(postgres):
    """Back at revision 0011 the older code inserts no `tsv` on PostgreSQL: the downgrade
    makes it generated from the raw text again, so the chunks the older code stores are
    found by text; upgrading once more makes it this code's again."""
    url = postgres.create_database()
    store = Store(url)
    assert kb.prepare_index(store.repo) is None
    store.close()
    with _at_revision(url, "0011", migrate=command.downgrade) as conn:
        _insert_as_older_code(conn, "file_en", "A small kitten naps on the rug.")
        _insert_as_older_code(conn, "file_ja", "富士山は日本で最も高い山です。")
        written = "SELECT count(*) FROM retrieval_chunks WHERE tsv_length IS NOT NULL"
        assert conn.exec_driver_sql(written).scalar_one() == 2
    store = Store(url)
    try:
        assert kb.prepare_index(store.repo) is None
        assert _found_by_text(store, "kittens") == ["file_en"]
        assert _found_by_text(store, "日本") == ["file_ja"]
    finally:
        store.close()


def test_downgrading_a_store_keeps_the_rows_of_the_tables_it_rebuilds(database_url):
    """SQLite drops a column by copying the table (Alembic's batch mode): dropping the old
    `files`, `responses` or `users` must not cascade to the rows that reference them (a
    file's bytes, a response's items), as it would with foreign keys enforced."""
    with _at_revision(database_url, "0006") as conn:
        conn.execute(
            text(
                "INSERT INTO files (id, owner_id, purpose, body) "
                "VALUES ('file_old', 'alice', 'assistants', '{}')"
            )
        )
        conn.execute(text("INSERT INTO file_blobs (file_id, data) VALUES ('file_old', 'abc')"))
        conn.execute(
            text(
                "INSERT INTO responses (id, owner_id, created_at, status, body) "
                "VALUES ('resp_old', 'alice', 1, 'completed', '{}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO response_items (id, response_id, owner_id, kind, body) "
                "VALUES ('msg_old', 'resp_old', 'alice', 'input', '{}')"
            )
        )
    Store(database_url).close()  # upgraded to the newest revision
    with _at_revision(database_url, "0006", migrate=command.downgrade) as conn:
        blobs = conn.execute(text("SELECT file_id FROM file_blobs")).scalars().all()
        items = conn.execute(text("SELECT id FROM response_items")).scalars().all()
    assert (blobs, items) == (["file_old"], ["msg_old"])


@dataclass
class _PagedList:
    """A list of the store and its model: each object's place in the list (`keys`, in the
    list's ascending order), those not yet deleted, and how to delete, page and add one
    more object (`create`: its id and its place)."""

    keys: dict[str, tuple]
    delete: Callable[[str], bool]
    page: Callable[[Page], tuple[list[str], bool]]
    create: Callable[[], tuple[str, tuple]]
    live: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.live = set(self.keys)

    def expected(self, page: Page) -> tuple[list[str], bool]:
        backwards = page.before is not None
        cursor = page.before if backwards else page.after
        rising = (page.order == "asc") != backwards
        place = None if cursor is None else self.keys[cursor]
        ahead = sorted(
            (key, i)
            for i, key in self.keys.items()
            if i in self.live and (place is None or (key > place if rising else key < place))
        )
        if not rising:
            ahead.reverse()
        found = [i for _, i in ahead[: page.limit]]
        return (found[::-1] if backwards else found), len(ahead) > page.limit


def _conversation_items(repo: Repository, created_at: list[int]) -> tuple[_PagedList, list[str]]:
    """A conversation's items, and ids that never named one of them: made up, another
    conversation's item (one deleted too), another owner's."""
    run = uuid.uuid4().hex
    ids = [f"msg_{run}_{i}" for i in range(len(created_at))]
    conv = f"conv_{run}"
    repo.create_conversation("alice", conv, 1, {}, [_message(i, i) for i in ids])
    repo.create_conversation("alice", f"conv_o{run}", 1, {}, [_message(f"o{run}", "")])
    repo.create_conversation("alice", f"conv_d{run}", 1, {}, [_message(f"d{run}", "")])
    repo.delete_conversation_item("alice", f"conv_d{run}", f"d{run}")
    repo.create_conversation("bob", f"conv_b{run}", 1, {}, [_message(f"b{run}", "")])
    places = itertools.count(len(ids))

    def create() -> tuple[str, tuple]:
        place = next(places)
        item_id = f"msg_{run}_{place}"
        assert repo.add_conversation_items("alice", conv, 2, [_message(item_id, item_id)])
        return item_id, (place,)

    listed = _PagedList(
        {item_id: (place,) for place, item_id in enumerate(ids)},
        lambda i: repo.delete_conversation_item("alice", conv, i),
        lambda page: _ids(repo.list_conversation_items("alice", conv, page)),
        create,
    )
    return listed, [f"msg_{run}_x", f"o{run}", f"d{run}", f"b{run}"]


def _ids(page) -> tuple[list[str], bool]:
    return [item["id"] for item in page.items], page.has_more


def _conversations(repo: Repository, created_at: list[int]) -> tuple[_PagedList, list[str]]:
    """An owner's conversations, some created in the same second (then ordered by id), and
    ids that never named one of them: made up, another owner's (one deleted too), an
    item's."""
    run = uuid.uuid4().hex
    owner = f"user_{run}"
    ids = [f"conv_{uuid.uuid4().hex}" for _ in created_at]
    for conv, at in zip(ids, created_at, strict=True):
        repo.create_conversation(owner, conv, at, {}, [])
    repo.create_conversation(owner, f"conv_i{run}", 9, {}, [_message(f"msg_{run}", "")])
    repo.delete_conversation(owner, f"conv_i{run}")
    for other in (f"conv_b{run}", f"conv_d{run}"):
        repo.create_conversation("bob", other, 0, {}, [])
    repo.delete_conversation("bob", f"conv_d{run}")

    def page(page: Page) -> tuple[list[str], bool]:
        rows, more = repo.list_conversations(owner, page)
        return [row.id for row in rows], more

    def create() -> tuple[str, tuple]:
        """A conversation made in the latest second so far: after the earlier seconds',
        among that second's by its id."""
        conv, at = f"conv_{uuid.uuid4().hex}", max(created_at)
        repo.create_conversation(owner, conv, at, {}, [])
        return conv, (at, conv)

    listed = _PagedList(
        {conv: (at, conv) for conv, at in zip(ids, created_at, strict=True)},
        lambda i: repo.delete_conversation(owner, i),
        page,
        create,
    )
    return listed, ["conv_x", f"conv_b{run}", f"conv_d{run}", f"msg_{run}"]


def _in_order_made(
    ids: list[str],
    add: Callable[[str], None],
    delete: Callable[[str], bool],
    page: Callable[[Page], tuple[list[str], bool]],
    made: Callable[[int], str],
) -> _PagedList:
    """A list in the order its objects were made (`seq`), from ids[0] on, each added by
    `add`; `made(n)` is the id of the n-th, and a later object always sorts after the
    earlier ones, deleted or not."""
    for object_id in ids:
        add(object_id)
    places = itertools.count(len(ids))

    def create() -> tuple[str, tuple]:
        place = next(places)
        add(made(place))
        return made(place), (place,)

    return _PagedList({i: (place,) for place, i in enumerate(ids)}, delete, page, create)


def _files(repo: Repository, created_at: list[int]) -> tuple[_PagedList, list[str]]:
    """An owner's files, and ids that never named one of them: made up, another owner's
    (one deleted too), a vector store's."""
    run = uuid.uuid4().hex
    owner, now = f"user_{run}", int(time.time())

    def add(file_id: str, to: str = owner) -> None:
        body = {"id": file_id, "purpose": "assistants", "created_at": now, "expires_at": None}
        kb.add_file(repo, to, body, None, b"x")

    for other in (f"file_b{run}", f"file_d{run}"):
        add(other, "bob")
    assert kb.delete_file(repo, "bob", f"file_d{run}", now)
    listed = _in_order_made(
        [f"file_{run}_{i}" for i in range(len(created_at))],
        add,
        lambda i: kb.delete_file(repo, owner, i, now),
        lambda page: _ids(kb.list_files(repo, owner, page, None, now)),
        lambda n: f"file_{run}_{n}",
    )
    return listed, [f"file_{run}_x", f"file_b{run}", f"file_d{run}", f"vs_{run}"]


def _vector_store_body(store_id: str) -> dict:
    return {"id": store_id, "created_at": 0, "last_active_at": 0, "expires_after": None}


def _vector_stores(repo: Repository, created_at: list[int]) -> tuple[_PagedList, list[str]]:
    """An owner's vector stores, and ids that never named one of them: made up, another
    owner's (one deleted too), a file's."""
    run = uuid.uuid4().hex
    owner = f"user_{run}"
    for other in (f"vs_b{run}", f"vs_d{run}"):
        kb.add_vector_store(repo, "bob", _vector_store_body(other), [])
    assert kb.delete_vector_store(repo, "bob", f"vs_d{run}")

    def page(page: Page) -> tuple[list[str], bool]:
        return _ids(kb.list_vector_stores(repo, owner, page)[0])

    listed = _in_order_made(
        [f"vs_{run}_{i}" for i in range(len(created_at))],
        lambda i: kb.add_vector_store(repo, owner, _vector_store_body(i), []),
        lambda i: kb.delete_vector_store(repo, owner, i),
        page,
        lambda n: f"vs_{run}_{n}",
    )
    return listed, [f"vs_{run}_x", f"vs_b{run}", f"vs_d{run}", f"file_{run}"]


def _store_file_body(file_id: str) -> dict:
    return {
        "id": file_id,
        "status": "in_progress",
        "attributes": {},
        "chunking_strategy": {"type": "auto"},
    }


def _vector_store_files(repo: Repository, created_at: list[int]) -> tuple[_PagedList, list[str]]:
    """A vector store's files, and ids that never named one of them: made up, another
    store's file (one removed too), another owner's."""
    run = uuid.uuid4().hex
    store, other = f"vs_{run}", f"vs_o{run}"
    kb.add_vector_store(repo, "alice", _vector_store_body(store), [])
    kb.add_vector_store(repo, "alice", _vector_store_body(other), [])
    kb.add_vector_store(repo, "bob", _vector_store_body(f"vs_b{run}"), [])
    for file_id in (f"file_o{run}", f"file_d{run}"):
        assert kb.add_store_files(repo, "alice", other, [_store_file_body(file_id)])
    assert kb.delete_store_file(repo, "alice", other, f"file_d{run}")
    assert kb.add_store_files(repo, "bob", f"vs_b{run}", [_store_file_body(f"file_b{run}")])

    def add(file_id: str) -> None:
        assert kb.add_store_files(repo, "alice", store, [_store_file_body(file_id)])

    listed = _in_order_made(
        [f"file_{run}_{i}" for i in range(len(created_at))],
        add,
        lambda i: kb.delete_store_file(repo, "alice", store, i),
        lambda page: _ids(kb.list_store_files(repo, "alice", store, page, None)),
        lambda n: f"file_{run}_{n}",
    )
    return listed, [f"file_{run}_x", f"file_o{run}", f"file_d{run}", f"file_b{run}"]


_PAGE_STEP = st.tuples(
    st.integers(-1, 11),  # the cursor: none, an object of the list, or an unknown id
    st.integers(1, 3),
    st.sampled_from(["asc", "desc"]),
    st.booleans(),  # before rather than after
)
# A step: delete the object at an index, make one more, or ask for a page.
_STEPS = st.lists(st.one_of(st.integers(0, 7), st.just("create"), _PAGE_STEP), max_size=12)


@pytest.mark.parametrize(
    "make", [_conversation_items, _conversations, _files, _vector_stores, _vector_store_files]
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(created_at=st.lists(st.integers(0, 2), min_size=1, max_size=8), steps=_STEPS)
# The newest object deleted, one more made, and the pages past the deleted one's place.
@example(created_at=[0, 0, 0], steps=[2, "create", (2, 3, "asc", False), (2, 3, "desc", True)])
def test_a_cursor_keeps_its_place_once_its_object_is_deleted(store, make, created_at, steps):
    """Under any deletes and additions, the page after (or before) an object of the list,
    deleted or not, is the model's: the live objects past the place it had, those made
    after it was deleted included. An id that never named an object of the list is still
    a 404 on the cursor's parameter."""
    listed, unknown = make(store.repo, created_at)
    ids = list(listed.keys)
    for step in steps:
        if step == "create":
            object_id, place = listed.create()
            listed.keys[object_id] = place
            listed.live.add(object_id)
            ids.append(object_id)
            continue
        if isinstance(step, int):
            object_id = ids[step % len(ids)]
            assert listed.delete(object_id) == (object_id in listed.live)
            listed.live.discard(object_id)
            continue
        at, limit, order, backwards = step
        cursor = None if at < 0 else (ids + unknown)[at % (len(ids) + len(unknown))]
        page = Page(limit, order=order, **{"before" if backwards else "after": cursor})
        if cursor in unknown:
            with pytest.raises(NotFoundError) as missing:
                listed.page(page)
            assert missing.value.param == ("before" if backwards else "after")
        else:
            assert listed.page(page) == listed.expected(page)


def test_a_deleted_objects_place_is_kept_a_day_and_goes_with_its_list(store, monkeypatch):
    """Tombstones stay few: a deleted item's id marks its place for `TOMBSTONE_SECONDS`,
    then is an unknown cursor again and purged at the next deletion; deleting the
    conversation deletes its items' tombstones at once."""
    repo = store.repo
    clock = [1_000_000.0]
    monkeypatch.setattr(repository.time, "time", lambda: clock[0])
    repo.create_conversation("alice", "conv_t", 1, {}, [_message(f"m_{i}", i) for i in range(4)])
    assert repo.delete_conversation_item("alice", "conv_t", "m_1")
    clock[0] += repository.TOMBSTONE_SECONDS
    page = repo.list_conversation_items("alice", "conv_t", Page(5, after="m_1", order="asc"))
    assert [i["id"] for i in page.items] == ["m_2", "m_3"]
    clock[0] += 1
    with pytest.raises(NotFoundError):
        repo.list_conversation_items("alice", "conv_t", Page(5, after="m_1"))
    assert repo.delete_conversation_item("alice", "conv_t", "m_2")
    assert [r.id for r in _tombstones(store)] == ["m_2"]
    assert repo.delete_conversation("alice", "conv_t")
    assert [(r.list_name, r.id) for r in _tombstones(store)] == [("conversations", "conv_t")]


def _tombstones(store: Store) -> list:
    with store.engine.connect() as conn:
        return conn.execute(select(cursor_tombstones)).all()
