"""The product's storage: SQLAlchemy tables, Alembic migrations and the repositories.

This package is the only code that runs SQL. Use `Store(url)` (migrates on open) and
`await store.call(Repository.method, owner, ...)`.
"""

from sqlalchemy.exc import OperationalError as StoreUnavailableError

from orchestrator.store.repository import (
    UNFINISHED,
    ConversationRow,
    History,
    ItemPage,
    Page,
    Repository,
    metadata_tag,
)
from orchestrator.store.store import (
    Store,
    check_database_url,
    database_error,
    hold_data_dir,
    hold_database,
    sqlite_url,
)

# What the database driver raises when the database does not answer (PostgreSQL down,
# a connection cut, SQLite's file locked past its timeout): the server's 503.

__all__ = [
    "UNFINISHED",
    "ConversationRow",
    "History",
    "ItemPage",
    "Page",
    "Repository",
    "Store",
    "StoreUnavailableError",
    "check_database_url",
    "database_error",
    "hold_data_dir",
    "hold_database",
    "metadata_tag",
    "sqlite_url",
]
