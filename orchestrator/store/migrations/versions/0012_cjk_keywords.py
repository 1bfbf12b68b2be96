"""The retrieval index's full text as `keyword_text` (on SQLite): runs of CJK characters
indexed as their two-character terms, so a word inside a Chinese or Japanese sentence
(no spaces) or a Korean word with its particle is found. The FTS5 table held each such
run as one token; its triggers now index `keyword_text(text)`, and the table is filled
again from the stored chunks.

PostgreSQL's index is not a migration (it needs pgvector): `PgIndex.create_schema`
brings an older table to the new form when the server prepares the index.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

from orchestrator.retrieval.index import FTS_DDL

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_TRIGGERS = ("retrieval_chunks_ai", "retrieval_chunks_ad", "retrieval_chunks_au")


def upgrade() -> None:
    """The text index and its triggers made again, over every chunk's keyword text (the
    store's connections have the `keyword_text` function)."""
    _rebuild(FTS_DDL, "keyword_text(text)")


def downgrade() -> None:
    """The older code indexes the raw text and has no `keyword_text` function."""
    raw = tuple(
        statement.replace("keyword_text(new.text)", "new.text").replace(
            "keyword_text(old.text)", "old.text"
        )
        for statement in FTS_DDL
    )
    _rebuild(raw, "text")


def _rebuild(ddl: tuple[str, ...], indexed: str) -> None:
    """Drop the FTS5 table and its triggers, run `ddl`, and index `indexed` (an SQL
    expression over `retrieval_chunks`) of every stored chunk."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for trigger in _TRIGGERS:
        bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
    bind.exec_driver_sql("DROP TABLE IF EXISTS retrieval_chunks_fts")
    for statement in ddl:
        bind.exec_driver_sql(statement)
    bind.exec_driver_sql(
        f"INSERT INTO retrieval_chunks_fts (rowid, text) SELECT id, {indexed} FROM retrieval_chunks"
    )
