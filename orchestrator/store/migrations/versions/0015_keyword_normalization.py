"""The retrieval index's terms as `keyword_text` makes them now: NFKC-normalised and
casefolded, so half-width and full-width forms are one term (ｶﾀｶﾅ and カタカナ, ＡＢＣ and
abc), and each run of CJK characters indexed with its single characters besides its
two-character terms, so a one-character query (猫) finds the character inside a run
(小猫). SQLite's FTS5 table is filled again from the stored chunks; on PostgreSQL the
`tsv` of every chunk whose text is not ASCII is written again (the text of the others
gives the same terms).

The downgrade indexes the chunks with the keyword text of revisions 0012 to 0014 (`cjk_bigrams`),
which the older code's triggers delete with: FTS5 removes a row only by the very terms it
was indexed with. On PostgreSQL, a table whose `tsv` PostgreSQL still generates (the index
of a version before 0012, not yet prepared by a newer one) is left to
`PgIndex.create_schema`, which writes it from `keyword_text`.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from orchestrator.retrieval.index import cjk_bigrams, rebuild_text_index
from orchestrator.retrieval.pg_index import reindex_keywords

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# PostgreSQL's index as this code makes it: `tsv` is a plain column, written from Python.
_PLAIN_TSV = text(
    "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
    "AND table_name = 'retrieval_chunks' AND column_name = 'tsv' AND is_generated = 'NEVER'"
)


def upgrade() -> None:
    """Every chunk indexed again with `keyword_text` (the store's SQLite connections have
    it as an SQL function)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        rebuild_text_index(bind)
    elif bind.execute(_PLAIN_TSV).first() is not None:
        reindex_keywords(bind)


def downgrade() -> None:
    """Every chunk indexed again with the keyword text of revisions 0012 to 0014, given to this
    connection as an SQL function of its own name."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        bind.connection.driver_connection.create_function(
            "cjk_bigrams", 1, cjk_bigrams, deterministic=True
        )
        rebuild_text_index(bind, indexed="cjk_bigrams(text)")
    elif bind.execute(_PLAIN_TSV).first() is not None:
        reindex_keywords(bind, cjk_bigrams)
