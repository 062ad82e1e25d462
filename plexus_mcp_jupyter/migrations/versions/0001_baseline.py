"""The baseline: the schema of the last release without migrations (tables made by create_all).

A store made by that release is stamped with this revision at its first start (migrations/__init__.py).

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The partial index of the wrong and unscored items (evaluations/store.py, MISMATCH): compiled per dialect.
_MISMATCH = sa.column("correct", sa.Boolean()).is_not(True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=12), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("last_used_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("rate_limit", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("key_id", sa.String(length=12), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("action", sa.String(length=128), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("client", sa.String(length=128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_action", "audit_log", ["action", "id"])
    op.create_index("ix_audit_at", "audit_log", ["at"])

    op.create_table(
        "expired_tasks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.Column("expired_at", sa.Float(), nullable=False),
        sa.Column("retention_seconds", sa.Float(), nullable=False),
        sa.Column("evaluation_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_expired_at", "expired_tasks", ["expired_at"])
    op.create_index("ix_expired_evaluation", "expired_tasks", ["evaluation_id"])

    op.create_table(
        "plexus_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.Column("estimated_completion_at", sa.Float(), nullable=True),
        sa.Column("current_stage", sa.String(length=128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_details", sa.JSON(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("stdout_tail", sa.Text(), nullable=True),
        sa.Column("stderr_tail", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=256), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("owner_role", sa.String(length=32), nullable=True),
        sa.Column("retention_seconds", sa.Float(), nullable=True),
        sa.Column("batch_id", sa.String(length=36), nullable=True),
        sa.Column("retry_of", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tasks_batch", "tasks", ["batch_id", "status"])
    op.create_index("ix_tasks_completed", "tasks", ["completed_at"])
    op.create_index("ix_tasks_created", "tasks", ["created_at", "id"])
    op.create_index("ix_tasks_owner_queue", "tasks", ["status", "priority", "owner", "created_at", "id"])
    op.create_index("ix_tasks_retry_of", "tasks", ["retry_of"])
    op.create_index("ix_tasks_status_created", "tasks", ["status", "created_at", "id"])
    op.create_index("ix_tasks_type_created", "tasks", ["type", "created_at", "id"])

    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("items_pruned_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id"),
    )
    op.create_index("ix_evaluations_created", "evaluations", ["created_at", "id"])
    op.create_index("ix_evaluations_type_created", "evaluations", ["type", "created_at", "id"])

    op.create_table(
        "progress_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(length=128), nullable=True),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_samples_task", "progress_samples", ["task_id", "id"])

    op.create_table(
        "task_stages",
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("stage_order", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("total_items", sa.Integer(), nullable=True),
        sa.Column("processed_items", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.Column("estimated_completion_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id", "stage_order"),
    )
    op.create_table(
        "evaluation_items",
        sa.Column("evaluation_id", sa.String(length=36), nullable=False),
        sa.Column("score", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Text(), nullable=True),
        sa.Column("input", sa.Text(), nullable=True),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("label_class", sa.Text(), nullable=True),
        sa.Column("prediction", sa.Text(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("evaluation_id", "score", "seq"),
    )
    op.create_index("ix_items_label", "evaluation_items", ["evaluation_id", "score", "label_class", "seq"])
    op.create_index(
        "ix_items_mismatches",
        "evaluation_items",
        ["evaluation_id", "score", "seq"],
        sqlite_where=_MISMATCH,
        postgresql_where=_MISMATCH,
    )

    op.bulk_insert(
        sa.table("plexus_meta", sa.column("key"), sa.column("value")), [{"key": "schema_version", "value": "1"}]
    )  # what releases before migrations check


def downgrade() -> None:
    for table in (
        "evaluation_items",
        "task_stages",
        "progress_samples",
        "evaluations",
        "tasks",
        "plexus_meta",
        "expired_tasks",
        "audit_log",
        "api_keys",
    ):
        op.drop_table(table)  # its indexes go with it
