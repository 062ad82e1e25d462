"""Evaluation items as Parquet files beside the store: `evaluations.items_manifest` (evaluations/item_files.py).

Evaluations made before this revision keep their items as rows of evaluation_items (their manifest is null)
and stay readable as before; the table remains for them. Idempotent, as 0002.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "items_manifest" not in {c["name"] for c in inspector.get_columns("evaluations")}:
        op.add_column("evaluations", sa.Column("items_manifest", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("evaluations", "items_manifest")
