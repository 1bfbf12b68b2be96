"""The retrieval index's full text as `keyword_text` (on SQLite): runs of CJK characters
indexed as their two-character terms, so a word inside a Chinese or Japanese sentence
(no spaces) or a Korean word with its particle is found. The FTS5 table held each such
run as one token; its triggers now index `keyword_text(text)`, and the table is filled
again from the stored chunks.

PostgreSQL's index is not a migration (it needs pgvector): `PgIndex.create_schema`
brings an older table to the new form when the server prepares the index. The downgrade
undoes that, since the older code cannot: `tsv` and `tsv_length` are generated from the
raw text again, the table the older code made and reads. Refusing would leave no way
back to it; leaving the plain columns would have it store every new chunk without a
`tsv`, silently out of text search.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from orchestrator.retrieval.index import FTS_DDL, rebuild_text_index

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# PostgreSQL's index as this code makes it: `tsv` is a plain column.
_PLAIN_TSV = text(
    "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
    "AND table_name = 'retrieval_chunks' AND column_name = 'tsv' AND is_generated = 'NEVER'"
)
# The older code's columns. Dropping `tsv` drops its indexes; the rewrite locks the table.
_GENERATED_TSV = (
    "ALTER TABLE retrieval_chunks DROP COLUMN tsv, DROP COLUMN tsv_length, "
    "ADD COLUMN tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED, "
    "ADD COLUMN tsv_length INTEGER "
    "GENERATED ALWAYS AS (length(to_tsvector('english', text))) STORED",
    "CREATE INDEX ix_retrieval_chunks_tsv ON retrieval_chunks USING gin (tsv)",
)


def upgrade() -> None:
    """The text index and its triggers made again, over every chunk's keyword text (the
    store's connections have the `keyword_text` function)."""
    _rebuild(FTS_DDL, "keyword_text(text)")


def downgrade() -> None:
    """The older code indexes the raw text and has no `keyword_text` function (on
    PostgreSQL it inserts no `tsv`: PostgreSQL generates it)."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        if bind.execute(_PLAIN_TSV).first() is not None:
            for statement in _GENERATED_TSV:
                bind.exec_driver_sql(statement)
        return
    raw = tuple(
        statement.replace("keyword_text(new.text)", "new.text").replace(
            "keyword_text(old.text)", "old.text"
        )
        for statement in FTS_DDL
    )
    _rebuild(raw, "text")


def _rebuild(ddl: tuple[str, ...], indexed: str) -> None:
    """`rebuild_text_index` on SQLite (PostgreSQL's index has no FTS5 table)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        rebuild_text_index(bind, ddl, indexed)
