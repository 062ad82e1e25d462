"""Alembic's entry point: migrations run on the connection plexus hands over (migrations/__init__.py)."""

from __future__ import annotations

from alembic import context

from plexus_mcp_jupyter.migrations import schema_metadata


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("plexus migrations run through plexus_mcp_jupyter.migrations (plexus db upgrade)")
    context.configure(
        connection=connection,
        target_metadata=schema_metadata(),
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
