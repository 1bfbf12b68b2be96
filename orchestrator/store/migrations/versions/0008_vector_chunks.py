"""The retrieval index's vectors in storage chunks of VECTOR_CHUNK (on SQLite): with
sqlite-vec's default of 1,024, each vector store holding any vector took 1.5 MB.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

from orchestrator.retrieval.index import vectors_ddl

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DIMENSIONS = 384  # all-MiniLM-L6-v2's, as in 0002


def upgrade() -> None:
    """The vectors move to a plain table, the `vec0` table is made again, and they move
    back: sqlite-vec cannot change a table's chunk size in place."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    bind.exec_driver_sql(
        "CREATE TEMP TABLE vectors_kept AS "
        "SELECT id, vector_store_id, owner_id, embedding FROM retrieval_vectors"
    )
    bind.exec_driver_sql("DROP TABLE retrieval_vectors")
    bind.exec_driver_sql(vectors_ddl(DIMENSIONS))
    bind.exec_driver_sql(
        "INSERT INTO retrieval_vectors (id, vector_store_id, owner_id, embedding) "
        "SELECT id, vector_store_id, owner_id, embedding FROM vectors_kept"
    )
    bind.exec_driver_sql("DROP TABLE vectors_kept")


def downgrade() -> None:
    """The smaller chunks are a valid layout for the older code too."""
