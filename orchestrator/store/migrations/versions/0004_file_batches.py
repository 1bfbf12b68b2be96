"""Vector store file batches, and the batch that added each vector store file.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "vector_store_file_batches",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", ID, nullable=False, unique=True),
        sa.Column(
            "vector_store_id",
            ID,
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("cancelled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index(
        "ix_vector_store_file_batches_store",
        "vector_store_file_batches",
        ["vector_store_id", "owner_id"],
    )
    with op.batch_alter_table("vector_store_files") as batch:
        batch.add_column(sa.Column("batch_id", ID, nullable=True))
    op.create_index("ix_vector_store_files_batch_id", "vector_store_files", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_vector_store_files_batch_id", "vector_store_files")
    op.drop_column("vector_store_files", "batch_id")
    op.drop_index("ix_vector_store_file_batches_store", "vector_store_file_batches")
    op.drop_table("vector_store_file_batches")
