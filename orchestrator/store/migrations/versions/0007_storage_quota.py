"""Per-user file storage quotas, and each file's size as a column they can sum.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("storage_quota_bytes", sa.BigInteger, nullable=True))
    op.add_column("files", sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"))
    op.execute(
        "UPDATE files SET bytes = coalesce("
        "(SELECT length(data) FROM file_blobs WHERE file_blobs.file_id = files.id), 0)"
    )


def downgrade() -> None:
    op.drop_column("files", "bytes")
    op.drop_column("users", "storage_quota_bytes")
