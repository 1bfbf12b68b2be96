"""Opening the database, migrating it, and calling the repositories off the event loop.

SQLite (the default: one file in the data directory) runs in WAL mode with
`synchronous=NORMAL`: a committed turn survives the process being killed, and readers
never wait for the writer. Every repository call runs on one worker thread, so the
event loop never blocks on the database and SQLite sees a single writer; PostgreSQL
goes through the same repositories (`postgresql+psycopg://…`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event, func, make_url, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from orchestrator.retrieval.index import prepare_sqlite_connection, sqlite_module
from orchestrator.store.advisory_claims import MIGRATION_LOCK
from orchestrator.store.repository import Repository
from orchestrator.store.servers import ServerLock

T = TypeVar("T")
log = logging.getLogger("tokenmill")
MIGRATIONS = Path(__file__).with_name("migrations")


def data_folder(data_dir: str | Path) -> Path:
    """The data directory, created if missing; ValueError naming it when it cannot be."""
    folder = Path(data_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the data directory {folder} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the data directory {folder}: {exc.strerror}") from None
    return folder


def sqlite_url(data_dir: str | Path) -> str:
    """The default database: `tokenmill.db` in the data directory (created if missing)."""
    return f"sqlite:///{data_folder(data_dir) / 'tokenmill.db'}"


def database_error(exc: SQLAlchemyError) -> str:
    """A database failure in one line: the driver's own message, without SQLAlchemy's
    wrapping (the statement, a link to its docs)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return " ".join(line.strip() for line in str(cause).splitlines() if line.strip())


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=10000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def check_database_url(url: str) -> None:
    """ValueError unless `url` is a SQLAlchemy URL of SQLite or PostgreSQL."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError(f"not a database URL: {url!r}") from None
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"the store runs on SQLite or PostgreSQL, not {backend!r}")


def create_db_engine(url: str) -> Engine:
    """ValueError for a URL of another database than SQLite or PostgreSQL, or one whose
    driver is not installed."""
    check_database_url(url)
    try:
        return _create_engine(url)
    except ImportError as exc:
        raise ValueError(
            f"the database URL's driver is not installed (no module {exc.name!r})"
        ) from None


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # sqlite-vec (the retrieval index's vectors) needs a sqlite3 that loads extensions;
        # the listener also gives each connection the text index's `keyword_text`.
        engine = create_engine(
            url, module=sqlite_module(), connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", prepare_sqlite_connection)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class SchemaTooNewError(ValueError):
    """The database's schema is of a revision this code does not know."""


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it is current)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            _set_foreign_keys(conn, on=False)
        try:
            with conn.begin():
                upgraded = _upgrade(engine, conn, config)
        finally:
            if sqlite:
                _set_foreign_keys(conn, on=True)
    if upgraded and sqlite:
        _reclaim_free_pages(engine)


def _upgrade(engine: Engine, conn: Connection, config: Config) -> bool:
    """Run the migrations up to the newest revision in `conn`'s transaction; whether
    there were any. On SQLite, foreign keys are off meanwhile: a migration that rebuilds
    a table (SQLite alters most things by copying the table and dropping the old one)
    would otherwise delete the rows referencing it with it, a file's bytes or a vector
    store's files."""
    if engine.dialect.name == "postgresql":
        # Servers sharing the database may start together: one migrates, the others
        # wait here (the lock is the transaction's) and then find the schema current.
        conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
    config.attributes["connection"] = conn
    before = MigrationContext.configure(conn).get_current_revision()
    try:
        command.upgrade(config, "head")
    except CommandError as exc:  # e.g. "Can't locate revision identified by '0099'"
        raise SchemaTooNewError(
            f"the database {engine.url.render_as_string(hide_password=True)} has a schema "
            f"this tokenmill does not know ({exc}): it was written by a newer version; "
            "upgrade tokenmill, or use another database"
        ) from None
    return before != MigrationContext.configure(conn).get_current_revision()


def _set_foreign_keys(conn: Connection, on: bool) -> None:
    """Turn SQLite's foreign keys on or off for `conn`, outside any transaction (inside
    one, SQLite ignores the pragma)."""
    conn.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    conn.commit()
    if conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() != on:
        raise RuntimeError(f"SQLite did not turn its foreign keys {'on' if on else 'off'}")
    conn.commit()


def _reclaim_free_pages(engine: Engine) -> None:
    """SQLite keeps the pages a migration's rebuilt tables freed (0008's old vector chunks)
    in the file; when they are a quarter of it or more, VACUUM gives them back once. It
    cannot run inside a transaction, so not in the migration itself. Best effort: a VACUUM
    that fails (another process reading the file, no disk for its copy) leaves the pages
    free, and the store works as before."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        if free and 4 * free >= pages:
            log.info("reclaiming %d free pages of %d after the schema upgrade", free, pages)
            try:
                conn.exec_driver_sql("VACUUM")
            except DBAPIError as exc:
                log.warning("could not reclaim them (%s); the file keeps them", exc.orig)


def hold_data_dir(data_dir: str | Path) -> IO[str]:
    """An exclusive lock on the data directory, held while the returned file is open. Its
    SQLite database belongs to one server: a server starting marks the unfinished responses
    incomplete, frees quota reservations and queues indexing again, taking the work of
    another one running there. ValueError when another process holds it."""
    folder = data_folder(data_dir)
    return _hold(folder / "tokenmill.lock", f"the data directory {folder}", "another --data-dir")


def hold_database(url: str) -> IO[str] | None:
    """The same lock for a SQLite database file, whichever option named it (`--data-dir`
    or `--database-url`): `<file>.lock` beside it. None for PostgreSQL, whose servers
    share a database by design (servers.py), and for an in-memory SQLite database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database).expanduser().absolute()
    lock_path = path.with_name(f"{path.name}.lock")
    return _hold(lock_path, f"the database {path}", "another --database-url")


def _hold(lock_path: Path, what: str, instead: str) -> IO[str]:
    """An exclusive lock on `lock_path` naming this process; ValueError naming `what` and
    its holder when another process has it."""
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 (held open, by design)
    except OSError as exc:
        raise ValueError(f"cannot lock {what}: {exc.strerror} ({lock_path})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(
            f"{what} is in use by another tokenmill server ({holder}); "
            f"stop it, or give this one {instead}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


class Store:
    """The repositories behind an async facade: `await store.call(Repository.method, ...)`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        migrate(self.engine)
        # A PostgreSQL database may be shared: this server's id marks the turns it runs.
        self.server_lock = (
            ServerLock(self.engine) if self.engine.dialect.name == "postgresql" else None
        )
        self.repo = Repository(
            self.engine, None if self.server_lock is None else self.server_lock.server_id
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-store")
        self._lookups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-lookup")

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        """Run `method(self.repo, *args)` on the store's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(method, self.repo, *args))

    async def lookup(self, method: Callable[..., T], *args: Any) -> T:
        """Run the read-only `method(self.repo, *args)` on a thread of its own, for the
        lookups every request makes before it can start (its key). On the worker thread
        they would queue behind its writes: when 16 streams end together their 16 usage
        rows are written one after another, and the requests their clients send next each
        waited 10-20 ms for that queue (measured through the server, docs/performance.md),
        reaching the engine spread over up to 60 ms. `method` must only read, through a
        connection of its own (`repo.engine.connect()`): it runs beside the writer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._lookups, functools.partial(method, self.repo, *args)
        )

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._lookups.shutdown(wait=True)
        if self.server_lock is not None:
            self.server_lock.close()
        self.engine.dispose()
