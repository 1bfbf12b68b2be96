"""File expiry: `files.expires_at`, the second from which a file is gone (null: it never
expires, as every file uploaded before this revision), indexed for the sweep that deletes
expired files.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("files", sa.Column("expires_at", sa.BigInteger, nullable=True))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    # Dropped in place (SQLite 3.35's ALTER TABLE DROP COLUMN), not by a batch's copy of
    # the table: dropping the old `files` would cascade to every file's bytes.
    op.drop_index("ix_files_expires_at", "files")
    op.drop_column("files", "expires_at")
