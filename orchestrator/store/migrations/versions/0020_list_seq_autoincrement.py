"""Seqs never given again in the lists paged by `seq` (files, vector stores, a vector
store's files), as conversation items' since 0011: on SQLite the three tables are rebuilt
AUTOINCREMENT. Without it SQLite gave a new row the highest seq there plus one, so a row
made right after the newest was deleted took its seq, the place its cursor tombstone
(0019) still marks, and a page after that cursor in `asc` order left the new row out.

Each table's counter starts past the places its tombstones hold too, so rows deleted
before this revision cannot have their place taken either. PostgreSQL's sequences never
give a value twice: nothing changes there. The rebuild drops the old tables, which must
not cascade to their rows' bytes and files: `migrate` runs SQLite's migrations with
foreign keys off, as SQLite's table rebuild requires.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

TABLES = ("files", "vector_stores", "vector_store_files")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass
        _start_counter_past_tombstones(table)


def _start_counter_past_tombstones(table: str) -> None:
    """Set the table's AUTOINCREMENT counter to the highest seq it holds or a tombstone
    of its list marks (0019's `position`, the deleted row's seq)."""
    conn = op.get_bind()
    highest = conn.execute(
        sa.text(
            f"SELECT max(coalesce((SELECT max(seq) FROM {table}), 0), coalesce(("
            "SELECT max(position) FROM cursor_tombstones WHERE list_name = :table), 0))"
        ),
        {"table": table},
    ).scalar_one()
    conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :table"), {"table": table})
    conn.execute(
        sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:table, :seq)"),
        {"table": table, "seq": highest},
    )


def downgrade() -> None:
    # The tables stay AUTOINCREMENT: the older code reads and writes them as before, and
    # rebuilding them again would only bring back the reuse.
    pass
