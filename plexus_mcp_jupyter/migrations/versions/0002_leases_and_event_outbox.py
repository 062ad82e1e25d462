"""Several servers on one store: a RUNNING task's lease, and the outbox of events relayed between servers.

`tasks.lease_expires_at` (core/leases.py) and `plexus_event_outbox` (core/relay.py); `plexus_meta.schema_version`
becomes 2, which releases from before migrations refuse. Idempotent: a store made
before migrations is completed from the current tables when it is adopted (migrations/__init__.py), so it
may have both already when it reaches this revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "lease_expires_at" not in {c["name"] for c in inspector.get_columns("tasks")}:
        op.add_column("tasks", sa.Column("lease_expires_at", sa.Float(), nullable=True))
    if not inspector.has_table("plexus_event_outbox"):
        op.create_table(
            "plexus_event_outbox",
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
            sa.Column("txid", sa.BigInteger(), nullable=True),
            sa.Column("origin", sa.String(length=128), nullable=False),
            sa.Column("at", sa.Float(), nullable=False),
            sa.Column("kind", sa.String(length=64), nullable=False),
            sa.Column("entity_type", sa.String(length=32), nullable=False),
            sa.Column("entity_id", sa.String(length=64), nullable=False),
            sa.Column("data", sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sqlite_autoincrement=True,
        )
        op.create_index("ix_outbox_txid", "plexus_event_outbox", ["txid", "id"], unique=False)
        op.create_index("ix_outbox_at", "plexus_event_outbox", ["at"], unique=False)

    # Releases from before migrations read plexus_meta.schema_version and refuse a store newer than 1: this one
    # claims without leases and relays nothing, so such a release must not run on it beside newer servers.
    _set_schema_version("2")


def _set_schema_version(value: str) -> None:
    meta = sa.table("plexus_meta", sa.column("key"), sa.column("value"))
    op.execute(sa.delete(meta).where(meta.c.key == "schema_version"))
    op.bulk_insert(meta, [{"key": "schema_version", "value": value}])


def downgrade() -> None:
    _set_schema_version("1")
    op.drop_index("ix_outbox_at", table_name="plexus_event_outbox")
    op.drop_index("ix_outbox_txid", table_name="plexus_event_outbox")
    op.drop_table("plexus_event_outbox")
    op.drop_column("tasks", "lease_expires_at")
