"""A task's final write carries its stages and progress samples in its own row (`tasks.trail`, JSON) instead of
rows of task_stages and progress_samples: a small task's whole life is that one write, and its child rows (a
stage, two samples, their index entries and foreign-key checks) were about a third of PostgreSQL's work per task.
Readers merge the trail over the child rows (core/store.py: a stage in the trail replaces the row of its order,
its samples follow the table's), so existing rows need no change: upgrading adds the column. "No trail" is SQL
NULL; a store written before the column's none_as_null may hold JSON null for it, which readers and the
downgrade take as no trail too. Downgrading moves each trail into the child tables, then drops the column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The trail's item orders, as this revision wrote them (not imported: a revision keeps its own tables' shape).
STAGE_COLUMNS = (
    "stage_order",
    "name",
    "status",
    "status_message",
    "total_items",
    "processed_items",
    "started_at",
    "completed_at",
    "estimated_completion_at",
)
SAMPLE_COLUMNS = ("at", "stage", "processed", "total", "message")


def upgrade() -> None:
    if "trail" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("tasks")}:
        op.add_column("tasks", sa.Column("trail", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    stages = sa.table("task_stages", sa.column("task_id"), *map(sa.column, STAGE_COLUMNS))
    samples = sa.table("progress_samples", sa.column("task_id"), *map(sa.column, SAMPLE_COLUMNS))
    rows = bind.execute(sa.text("SELECT id, trail FROM tasks WHERE trail IS NOT NULL")).all()
    for task_id, trail in rows:
        trail = json.loads(trail) if isinstance(trail, str) else trail
        if trail is None:  # JSON null (the code before none_as_null stored it for "no trail"): nothing to move
            continue
        for item in trail.get("stages", ()):
            row = dict(zip(STAGE_COLUMNS, item, strict=True))
            bind.execute(
                sa.delete(stages).where(stages.c.task_id == task_id, stages.c.stage_order == row["stage_order"])
            )
            bind.execute(sa.insert(stages).values(task_id=task_id, **row))
        for item in trail.get("samples", ()):
            bind.execute(sa.insert(samples).values(task_id=task_id, **dict(zip(SAMPLE_COLUMNS, item, strict=True))))
    op.drop_column("tasks", "trail")  # SQLite >= 3.35 drops a column in place
