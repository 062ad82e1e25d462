"""The event outbox packed: a row per relay send carrying all its events (`heads`: each event's time, kind,
entity and status; `data`: each event's entity state; JSON texts stored as text, which the database does not
parse), instead of a row per event. The store's cost of relaying becomes one row and its index entries per send
(core/relay.py). The outbox holds only the last `event_relay_keep_seconds` of relayed events, so it is made anew
rather than converted: servers upgrading restart, and a relay starts reading after what is already there. On
PostgreSQL built with lz4, the packed columns are compressed with it (cheaper than the default pglz for the JSON of
a large send).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLE = "plexus_event_outbox"
INDEXES = {"ix_outbox_txid": ["txid", "id"], "ix_outbox_at": ["at"]}


def _create(*payload: sa.Column) -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=True),
        sa.Column("origin", sa.String(length=128), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        *payload,
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    for name, columns in INDEXES.items():
        op.create_index(name, TABLE, columns, unique=False)


def _drop() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name=TABLE, if_exists=True)
    op.drop_table(TABLE, if_exists=True)


def upgrade() -> None:
    _drop()
    _create(sa.Column("heads", sa.Text(), nullable=False), sa.Column("data", sa.Text(), nullable=False))
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        lz4 = bind.exec_driver_sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar()
        if lz4:
            op.execute(
                f"ALTER TABLE {TABLE} ALTER COLUMN heads SET COMPRESSION lz4, ALTER COLUMN data SET COMPRESSION lz4"
            )


def downgrade() -> None:
    _drop()
    _create(
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("entity_type", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
