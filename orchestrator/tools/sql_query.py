"""`sql_query`: read-only SQL on the SQLite database the operator configures.

Read-only is enforced by SQLite itself, twice: the file is opened with `mode=ro` (no
write can reach it, whatever the statement), and an authorizer allows only reading
(SELECT, reading columns, functions, CTEs) and refuses everything else: writes, schema
changes, ATTACH (which would open another file), PRAGMA and transactions, and the
functions that reach past SQL (`_DENIED_FUNCTIONS`). A progress handler stops a query at
its time limit or when the call is cancelled; no value may grow past `MAX_VALUE_BYTES`
and no row past `MAX_RESULT_COLUMNS` values; rows are read one at a time, at most
`max_rows` of them and none once their text passes `MAX_READ_CHARS`, and that text is
capped. Queries run in a worker thread, never on the event loop.

The database's shape is read once, at start (orchestrator/tools/sql_grammar.py): the
description the model reads lists its tables, columns and categorical values, and
`argument_schema` (what a call is decoded under, never shown to the model) holds a
regular expression of the SELECT statements that can run on it.

Without `--tool-database`, the tool serves the demo sales database shipped in
`orchestrator/tools/data/` (built from demo_sales.sql by scripts/build_demo_db.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from orchestrator.tools.base import ToolError, ToolOutput, ToolUnavailable, string_argument
from orchestrator.tools.sql_grammar import Table, describe, read_shape, select_pattern
from orchestrator.untrusted import cap

DATA = Path(__file__).parent / "data"
DEMO_DATABASE = DATA / "demo_sales.db"
DEMO_SQL = DATA / "demo_sales.sql"
MAX_SQL_CHARS = 4000

_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


# Functions a query may not call: fts3_tokenizer hands out a native pointer of the SQLite
# library, load_extension would load code, and printf (format is its other name) pads
# each `%.*c` field to the width asked past the length limit, seconds per field in one
# call the progress handler cannot interrupt (a 4,000-character query holds ~150 fields).
_DENIED_FUNCTIONS = {"fts3_tokenizer", "load_extension", "printf", "format"}
# The longest string or blob a query may make: a zeroblob of half a gigabyte would
# otherwise take seconds and gigabytes in one function call, which the progress handler
# cannot interrupt.
MAX_VALUE_BYTES = 65_536
MAX_OUTPUT_CHARS = 64_000  # the rows' CSV, whatever the rows hold
# What the rows may cost before the rest is left unread: a row holds at most
# MAX_RESULT_COLUMNS values of MAX_VALUE_BYTES (SQLite allows 2,000 columns, 128 MB a
# row), and the text read stops past MAX_READ_CHARS (200 rows of 40 blobs each were 2 GB
# of CSV, built past the time limit, which covers only SQLite's own work).
MAX_RESULT_COLUMNS = 100
MAX_READ_CHARS = 4 * MAX_OUTPUT_CHARS
# What a query may write to SQLite's temporary files (a sort, DISTINCT or GROUP BY that
# outgrows memory spills to /var/tmp): ordering rows of 64 KB values wrote 5 GB there in
# the 5 s time limit. The database is read-only, so all a query's thread writes is those.
MAX_TEMP_BYTES = 256 << 20
_IO_CHECK_SECONDS = 0.01  # how often the progress handler reads what the thread wrote


def _authorize(
    action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def build_database(sql: Path, target: Path) -> None:
    """Write the database `sql` describes to `target` (replaced if it exists)."""
    target.unlink(missing_ok=True)
    with sqlite3.connect(target) as db:
        db.executescript(sql.read_text())
    db.close()


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(
        f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, check_same_thread=False
    )


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write, attach, change settings or make huge values."""
    db = _connect(path)
    db.set_authorizer(_authorize)
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    return db


def _written_bytes() -> int | None:
    """The bytes the calling thread has written (Linux's per-thread `wchar`), or None where
    the kernel does not say."""
    try:
        with open("/proc/thread-self/io", "rb") as f:
            return int(f.read().split(b"wchar:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class _Watch:
    """SQLite's progress handler for one query: stop it when the call is cancelled, at its
    deadline, or once its thread has written MAX_TEMP_BYTES (`spilled`)."""

    cancelled: threading.Event
    deadline: float
    written: int | None = field(default_factory=_written_bytes)  # at the start
    next_io_check: float = 0.0
    spilled: bool = False

    def __call__(self) -> int:
        now = time.monotonic()
        if self.cancelled.is_set() or now > self.deadline:
            return 1
        if self.written is not None and now >= self.next_io_check:
            self.next_io_check = now + _IO_CHECK_SECONDS
            self.spilled = (_written_bytes() or 0) - self.written > MAX_TEMP_BYTES
        return int(self.spilled)


def _shape(path: Path) -> list[Table]:
    """The database's tables, columns and categorical values, read once at start.
    (Our own connection: it reads table_info, which the tool's authorizer refuses.)"""
    db = _connect(path)
    try:
        return read_shape(db)
    finally:
        db.close()


def _table_text(cursor: sqlite3.Cursor, max_rows: int) -> str:
    """The query's rows as CSV, read one at a time: at most `max_rows`, and none more once
    the text passes MAX_READ_CHARS. Raises sqlite3 errors met while stepping the query."""
    columns = [d[0] for d in cursor.description or ()]
    if len(columns) > MAX_RESULT_COLUMNS:
        raise ToolError(
            f"the query returns {len(columns)} columns; at most {MAX_RESULT_COLUMNS} can come back"
        )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    shown, more = 0, False
    for row in cursor:
        if shown == max_rows or out.tell() > MAX_READ_CHARS:
            more = True
            break
        writer.writerow(row)
        shown += 1
    count = f"first {shown} rows; the query returned more" if more else f"{shown} rows"
    return f"{cap(out.getvalue(), MAX_OUTPUT_CHARS)}({count})"


class SqlQuery:
    name = "sql_query"
    parameters: ClassVar[dict] = {
        "type": "object",
        "properties": {"sql": {"type": "string", "description": "One SQLite SELECT statement."}},
        "required": ["sql"],
        "additionalProperties": False,
    }

    def __init__(
        self, database: Path | None = None, max_rows: int = 200, time_limit: float = 5.0
    ) -> None:
        self.database = database or DEMO_DATABASE
        if not self.database.is_file():
            raise ToolUnavailable(f"the sql_query database {self.database} does not exist")
        self.max_rows = max_rows
        self.time_limit = time_limit
        try:
            shape = _shape(self.database)
        except sqlite3.DatabaseError as exc:
            raise ToolUnavailable(f"the sql_query database cannot be read: {exc}") from None
        if not shape:
            raise ToolUnavailable(f"the sql_query database {self.database} has no tables")
        self.description = (
            f"Run one read-only SQLite SELECT query and get the rows back as "
            f"CSV (at most {max_rows}).\n{describe(shape)}"
        )
        # Decoding enforces this; the model is shown `parameters` and the description.
        sql = {**self.parameters["properties"]["sql"], "pattern": select_pattern(shape)}
        self.argument_schema = {**self.parameters, "properties": {"sql": sql}}

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        sql = string_argument(arguments, "sql", MAX_SQL_CHARS)
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._query, sql, cancelled)
        finally:  # a cancelled call stops the query at its next progress check
            cancelled.set()

    def _query(self, sql: str, cancelled: threading.Event) -> ToolOutput:
        watch = _Watch(cancelled, time.monotonic() + self.time_limit)
        db = open_read_only(self.database)
        db.set_progress_handler(watch, 1000)
        try:
            return ToolOutput(_table_text(db.execute(sql), self.max_rows))
        except sqlite3.DatabaseError as exc:
            if "interrupted" in str(exc) and watch.spilled:
                raise ToolError(
                    f"the query needed more than {MAX_TEMP_BYTES >> 20} MiB of temporary "
                    "storage (a large sort, DISTINCT or GROUP BY)"
                ) from None
            if "interrupted" in str(exc):
                raise ToolError(f"the query ran longer than {self.time_limit:g} s") from None
            if "not authorized" in str(exc) or "authorization denied" in str(exc):
                raise ToolError("only reading queries (SELECT) are allowed") from None
            raise ToolError(f"SQLite error: {exc}") from None
        except sqlite3.Warning as exc:  # e.g. more than one statement
            raise ToolError(f"SQLite error: {exc}") from None
        finally:
            db.close()
