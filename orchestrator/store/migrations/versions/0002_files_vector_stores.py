"""Files, vector stores, their files, and (on SQLite) the retrieval index.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.retrieval.index import SqliteIndex

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.String(64)
# all-MiniLM-L6-v2's dimensions: the vectors the index holds.
DIMENSIONS = 384


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False, unique=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("content_type", sa.String(128), nullable=True),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index("ix_files_owner_id", "files", ["owner_id"])
    op.create_table(
        "vector_stores",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False, unique=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index("ix_vector_stores_owner_id", "vector_stores", ["owner_id"])
    op.create_table(
        "vector_store_files",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False),
        sa.Column(
            "vector_store_id",
            ID,
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.UniqueConstraint("vector_store_id", "id", name="uq_vector_store_files_store_id_id"),
    )
    op.create_index("ix_vector_store_files_status", "vector_store_files", ["status"])
    op.create_index("ix_vector_store_files_id", "vector_store_files", ["id"])
    # The index's vectors (sqlite-vec) and full text (FTS5) exist on SQLite only; on
    # PostgreSQL the vector store routes answer that search is not supported there yet.
    if op.get_bind().dialect.name == "sqlite":
        SqliteIndex(DIMENSIONS).create_schema(op.get_bind())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in ("retrieval_chunks_fts", "retrieval_vectors", "retrieval_chunks"):
            bind.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    op.drop_table("vector_store_files")
    op.drop_table("vector_stores")
    op.drop_table("files")
