"""The product's storage: SQLAlchemy tables, Alembic migrations and the repositories.

This package is the only code that runs SQL. Use `Store(url)` (migrates on open) and
`await store.call(Repository.method, owner, ...)`.
"""

from orchestrator.store.repository import ConversationRow, History, ItemPage, Page, Repository
from orchestrator.store.store import Store, sqlite_url

__all__ = ["ConversationRow", "History", "ItemPage", "Page", "Repository", "Store", "sqlite_url"]
