"""The product's storage: SQLAlchemy tables, Alembic migrations and the repositories.

This package is the only code that runs SQL. Use `Store(url)` (migrates on open) and
`await store.call(Repository.method, owner, ...)`.
"""

from orchestrator.store.repository import ConversationRow, History, ItemPage, Page, Repository
from orchestrator.store.store import Store, hold_data_dir, sqlite_url

__all__ = [
    "ConversationRow",
    "History",
    "ItemPage",
    "Page",
    "Repository",
    "Store",
    "hold_data_dir",
    "sqlite_url",
]
