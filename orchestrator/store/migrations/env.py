"""Alembic's entry point: migrations run on the connection the store hands over
(`config.attributes["connection"]`), never on a URL of their own.

A migration drops a column in place (`op.drop_column`, which SQLite has since 3.35), not
through a batch (`op.batch_alter_table`): on SQLite a batch copies the table and drops the
old one, and with foreign keys on that drop cascades to every row referencing the table, a
response's items or a file's bytes. The store's `migrate` runs the upgrades with them off
(0020 rebuilds `files` and `vector_stores`), but a downgrade run on a connection of its
own (the tests') may have them on. Batches remain for what SQLite cannot alter in place."""

from __future__ import annotations

from alembic import context

from orchestrator.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
