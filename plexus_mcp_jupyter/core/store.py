"""Durable storage of tasks, stages and progress history on SQLAlchemy Core.

SQLite (WAL mode) by default, any SQLAlchemy URL (PostgreSQL) by configuration. Every write is one
transaction, so a failure leaves no half-written row. The Store knows nothing of HTTP or MCP.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import operator
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from .errors import InvalidArgument
from .listing_cache import WriteGeneration
from .models import FINAL_STATUSES, STAGE_NAME_MAX, ProgressSample, Stage, StageStatus, Task, TaskStatus
from .ownership import visible_to
from .requests import MAX_CURSOR_CHARS, cursor_too_long
from .retention import RetentionPolicy

log = logging.getLogger("plexus_mcp_jupyter")

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints of a SQLite store (_Checkpointer)
CHECKPOINT_FALLBACK_PAGES = 20_000  # SQLite checkpoints on commit past this many WAL pages (80 MB)

metadata = sa.MetaData()

tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("owner", sa.String(128)),
    sa.Column("params", sa.JSON),
    sa.Column("description", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("estimated_completion_at", sa.Float),
    sa.Column("current_stage", sa.String(STAGE_NAME_MAX)),
    sa.Column("error_message", sa.Text),
    # None is SQL NULL, not the JSON text 'null' (sa.JSON's default): a small task has neither, and each 'null'
    # was a json.dumps at its insert and final write and a json.loads of its claim's row, on the store writer
    # thread. Rows written before hold 'null', which every read takes as None too.
    sa.Column("error_details", sa.JSON(none_as_null=True)),
    sa.Column("output", sa.JSON(none_as_null=True)),
    sa.Column("stdout_tail", sa.Text),
    sa.Column("stderr_tail", sa.Text),
    sa.Column("worker", sa.String(256)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("owner_role", sa.String(32), nullable=True),  # weighted fair share (core/queue.py)
    sa.Column("retention_seconds", sa.Float, nullable=True),  # the task's own retention (an MCP ttl)
    sa.Index("ix_tasks_created", "created_at", "id"),
    sa.Index("ix_tasks_status_created", "status", "created_at", "id"),
    sa.Index("ix_tasks_type_created", "type", "created_at", "id"),
    # Partial indexes (revision 0004): a status change touches only the indexes a task is in, and most tasks are
    # in none of these (a final write took twice as long with them whole). A query uses one only when its WHERE
    # implies the index's: a queue query says status = 'QUEUED' as a literal (_IS_QUEUED), not a parameter.
    sa.Index(  # retention finds the oldest finished tasks
        "ix_tasks_completed",
        "completed_at",
        sqlite_where=sa.text("completed_at IS NOT NULL"),
        postgresql_where=sa.text("completed_at IS NOT NULL"),
    ),
    sa.Index(  # the queue's shares: the queued tasks only (status first all the same: SQLite plans with it)
        "ix_tasks_owner_queue",
        "status",
        "priority",
        "owner",
        "created_at",
        "id",
        sqlite_where=sa.text("status = 'QUEUED'"),
        postgresql_where=sa.text("status = 'QUEUED'"),
    ),
    # Added by later releases (nullable: an older store gets them from its migration, migrations/).
    sa.Column("batch_id", sa.String(36), nullable=True),  # the batch it was dispatched in (core/batches.py)
    sa.Column("retry_of", sa.String(36), nullable=True),  # the task this one is a new attempt of
    sa.Index(
        "ix_tasks_batch",
        "batch_id",
        "status",
        sqlite_where=sa.text("batch_id IS NOT NULL"),
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    ),
    sa.Index(
        "ix_tasks_retry_of",
        "retry_of",
        sqlite_where=sa.text("retry_of IS NOT NULL"),
        postgresql_where=sa.text("retry_of IS NOT NULL"),
    ),
    # Until when the claiming server's heartbeat holds a RUNNING task (core/leases.py); past it, any server on
    # the store may recover the task. None: claimed by a release without leases (recovered by process id).
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    # The stages and progress samples of a task's final write (revision 0006), carried by its row instead of rows
    # of task_stages and progress_samples: a small task's whole life is that write, and its child rows (a stage,
    # two samples, their index entries and foreign-key checks) were a third of PostgreSQL's work per task. Read
    # over the child rows: a stage here replaces the row of its order, samples here follow the table's.
    # {"stages": [[order, name, status, message, total, processed, started, completed, eta], ...],
    #  "samples": [[at, stage, processed, total, message], ...]}; SQL NULL: everything is in the child tables (a
    # store written before none_as_null may hold JSON 'null' for that: every reader takes it as no trail).
    sa.Column("trail", sa.JSON(none_as_null=True), nullable=True),
)

stages_table = sa.Table(
    "task_stages",
    metadata,
    sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("stage_order", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(STAGE_NAME_MAX), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_message", sa.Text),
    sa.Column("total_items", sa.Integer),
    sa.Column("processed_items", sa.Integer, nullable=False, default=0),
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("estimated_completion_at", sa.Float),
)

samples_table = sa.Table(
    "progress_samples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("stage", sa.String(STAGE_NAME_MAX)),
    sa.Column("processed", sa.Integer, nullable=False),
    sa.Column("total", sa.Integer),
    sa.Column("message", sa.Text),
    sa.Index("ix_samples_task", "task_id", "id"),
)

# Tombstones of tasks pruned by retention (core/retention.py): an expired id answers "expired on <date>"
# rather than "not found". They are pruned in turn, after as long again as the task was kept.
expired_table = sa.Table(
    "expired_tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("completed_at", sa.Float),
    sa.Column("expired_at", sa.Float, nullable=False),
    sa.Column("retention_seconds", sa.Float, nullable=False),
    sa.Column("evaluation_id", sa.String(36), nullable=True),  # an evaluation task's: that id expires too
    sa.Index("ix_expired_at", "expired_at"),
    sa.Index("ix_expired_evaluation", "evaluation_id"),
)

meta_table = sa.Table(
    "plexus_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The events each server relays to the others sharing the store (core/relay.py), packed: a row per relay send
# (revision 0005), carrying every event of that send in order, written by the relay of the server that published
# them, read by the others', pruned by age. The store's cost is per send, not per event (a row and three index
# entries per send: a task's events were about two rows each).
outbox_table = sa.Table(
    "plexus_event_outbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    # PostgreSQL: the writing transaction's id (readers take only rows of transactions older than every one
    # still running, so a row that commits late is never skipped). NULL on SQLite, whose writers are serial.
    sa.Column("txid", sa.BigInteger, nullable=True),
    sa.Column("origin", sa.String(128), nullable=False),  # the server id of the publisher
    sa.Column("at", sa.Float, nullable=False),  # when the row was sent (pruning)
    # JSON texts, written and read by the relay (text: the database stores them without parsing them). `heads`:
    # each event's [at, kind, entity_type, entity_id, status], in order, all a reader takes while nothing on its
    # server follows other servers' events; `data`: each event's entity state, in the same order.
    sa.Column("heads", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_outbox_txid", "txid", "id"),
    sa.Index("ix_outbox_at", "at"),
    sqlite_autoincrement=True,  # an id is never reused after pruning: readers continue after the last one seen
)
_TASK_COLUMNS = [c.name for c in tasks_table.columns]
_TASK_FIELDS = [name for name in _TASK_COLUMNS if name != "trail"]  # the Task's own (the row's trail: its stages)

# The hottest reads, built once: constructing and cache-keying a statement per call cost more than
# running it on SQLite.
_N_TASK_COLUMNS = len(_TASK_COLUMNS)
_SELECT_TASK_WITH_STAGES = (  # a row per stage (one with NULL stage columns for a task without stages)
    sa.select(tasks_table, stages_table)
    .select_from(tasks_table.outerjoin(stages_table, stages_table.c.task_id == tasks_table.c.id))
    .where(tasks_table.c.id == sa.bindparam("task_id"))
    .order_by(stages_table.c.stage_order)
)

# A task without a trail: SQL NULL, or the JSON 'null' the code before none_as_null stored (a final write without
# stages or samples, a re-queue, every insert). The cast: PostgreSQL's json has no equality operator.
_NO_TRAIL = sa.or_(tasks_table.c.trail.is_(None), sa.cast(tasks_table.c.trail, sa.Text) == "null")

_INSERT_TASK = sa.insert(tasks_table)
_INSERT_SAMPLES = sa.insert(samples_table)
# A queued task, as the partial index ix_tasks_owner_queue is defined: a literal, so the planner can use it.
_IS_QUEUED = tasks_table.c.status == sa.literal_column("'QUEUED'")
_QUEUED_ROW = sa.and_(tasks_table.c.id == sa.bindparam("b_id"), tasks_table.c.status == TaskStatus.QUEUED.value)
_CLAIMED = {
    "status": TaskStatus.RUNNING.value,
    "worker": sa.bindparam("b_worker"),
    "started_at": sa.bindparam("b_started_at"),
    "lease_expires_at": sa.bindparam("b_lease"),
}
_CLAIM = sa.update(tasks_table).where(_QUEUED_ROW).values(**_CLAIMED)
# PostgreSQL: the row is locked with FOR UPDATE SKIP LOCKED, so a server whose claim races another's skips the
# task at once (and plans again) instead of queueing behind the other's transaction; the status condition
# then holds under the lock. SQLite serialises writers: the plain conditional UPDATE is one writer transaction.
_CLAIM_SKIP_LOCKED = (
    sa.update(tasks_table)
    .where(
        tasks_table.c.id
        == sa.select(tasks_table.c.id).where(_QUEUED_ROW).with_for_update(skip_locked=True).scalar_subquery()
    )
    .values(**_CLAIMED)
)


# PostgreSQL, Store.claim_planned: planned tasks found by their ids, still QUEUED. Not the partial queue index's
# literal (`_IS_QUEUED`): beside an id, the planner could then scan that index for the status and filter the ids,
# which it did whenever its statistics were stale (a store that grew or drained since autovacuum last analysed it,
# as any new one in its first minute): every QUEUED task read per claim, and the claim's UPDATE joined to all of
# them (0.6-0.8 ms of PostgreSQL's CPU a claim with 1,000-2,000 queued, a third of its CPU per trivial task in
# bench_multi_server). `coalesce` matches no index: the ids find the rows, by the primary key (or a scan of a
# small table), whatever the statistics say.
_STILL_QUEUED = sa.func.coalesce(tasks_table.c.status, sa.literal_column("''")) == sa.literal_column("'QUEUED'")
# The planned tasks still QUEUED, locked (a row being claimed by another server's transaction is skipped, never
# waited for); then one UPDATE claims those locked (the status holds under the lock).
_LOCK_QUEUED = (
    sa.select(tasks_table.c.id)
    .where(tasks_table.c.id.in_(sa.bindparam("ids", expanding=True)), _STILL_QUEUED)
    .with_for_update(skip_locked=True)
)
# Claims undone within their transaction (Store.claim_planned with a transaction of its caller's): the tasks back as
# a QUEUED task is (never started, held by no server).
_UNCLAIM = (
    sa.update(tasks_table)
    .where(tasks_table.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(status=TaskStatus.QUEUED.value, worker=None, started_at=None, lease_expires_at=None)
)
# The one statement's claims undone when what follows it fails (`Store._ends_and_group_head`): back to QUEUED, each
# only while still this claim's (its worker, RUNNING).
_UNCLAIM_MINE = (
    sa.update(tasks_table)
    .where(
        tasks_table.c.id.in_(sa.bindparam("ids", expanding=True)),
        tasks_table.c.worker == sa.bindparam("b_worker"),
        tasks_table.c.status == TaskStatus.RUNNING.value,
    )
    .values(status=TaskStatus.QUEUED.value, worker=None, started_at=None, lease_expires_at=None)
)
_CLAIM_LOCKED = (
    sa.update(tasks_table)
    .where(tasks_table.c.id.in_(sa.bindparam("ids", expanding=True)), _STILL_QUEUED)
    .values(**_CLAIMED)
    .returning(tasks_table.c.id)
)
# The first round in one statement (the job-queue idiom): claim the first `n` of the plan's order (`order`) still
# QUEUED and not being claimed by another server. The order's ids are probed one by one, in order (`unnest`, and a
# LATERAL subquery that locks its one row by the primary key: a nested loop keeps the outer order, and the LIMIT
# stops it after the `n`th row locked, so no other row is locked). The pick is a MATERIALIZED CTE: as a subquery of
# the UPDATE, PostgreSQL may evaluate it again for each row, and each evaluation would then pick the next `n`
# (those claimed no longer QUEUED). The UPDATE finds the rows picked by their address (`ctid`, a TID scan: joined
# by id, stale statistics made it a hash join over the whole table), and their id: locked QUEUED rows, no status
# check (which would offer the planner the queue index again). A row's address stays its own while it is locked,
# but a row changed by a transaction that committed after this statement began (a re-prioritisation) is locked at
# its new version, which the UPDATE's snapshot does not see: the statement returns every row picked, and whether
# the UPDATE claimed it (`Store._claimed_first` claims the others by id; tests/test_claim_races.py).
_ORDER = (
    sa.func.unnest(sa.bindparam("order", type_=postgresql.ARRAY(sa.String))).table_valued("id").render_derived(name="o")
)
_PROBE = (
    sa.select(tasks_table.c.id, sa.literal_column("tasks.ctid").label("tid"))
    .where(tasks_table.c.id == _ORDER.c.id, _STILL_QUEUED)
    .with_for_update(skip_locked=True)
    .lateral("probe")
)
_PICKED = (
    sa.select(_PROBE.c.id, _PROBE.c.tid)
    .select_from(_ORDER)
    .join(_PROBE, sa.true())
    .limit(sa.bindparam("n"))
    .cte("picked")
    .prefix_with("MATERIALIZED")
)
_CLAIMED_BY_ADDRESS = (
    sa.update(tasks_table)
    .where(sa.literal_column("tasks.ctid") == _PICKED.c.tid, tasks_table.c.id == _PICKED.c.id)
    .values(**_CLAIMED)
    .returning(tasks_table.c.id)
    .cte("claimed")
)
_CLAIM_FIRST_QUEUED = sa.select(_PICKED.c.id, _CLAIMED_BY_ADDRESS.c.id.is_not(None)).select_from(
    _PICKED.outerjoin(_CLAIMED_BY_ADDRESS, _CLAIMED_BY_ADDRESS.c.id == _PICKED.c.id)
)


# PostgreSQL, Store.claim_group_head, in one statement: claim the first `n` QUEUED tasks of one (priority, owner)
# group, in the queue's order, skipping those another server is claiming (`SKIP LOCKED`, the job-queue idiom), and
# return them whole. As `_CLAIM_FIRST_QUEUED`: the pick is MATERIALIZED, the UPDATE finds its rows by address, and
# every row picked comes back with whether it was claimed (one changed by a transaction that committed after the
# statement began is claimed by id: `Store._claimed_first`).
def _queued_in_group(owned: bool, priority: str, owner: str) -> Any:
    """A QUEUED task of one (priority, owner) group (the queue index's condition), the group's values bound to the
    parameters `priority` and `owner` (an owner-less group's: none)."""
    t = tasks_table
    return sa.and_(
        _IS_QUEUED,
        t.c.priority == sa.bindparam(priority),
        t.c.owner == sa.bindparam(owner) if owned else t.c.owner.is_(None),
    )


_GROUP_PICKED = {
    owned: sa.select(tasks_table.c.id, sa.literal_column("tasks.ctid").label("tid"))
    .where(_queued_in_group(owned, "g_priority", "g_owner"))
    .order_by(tasks_table.c.created_at, tasks_table.c.id)
    .limit(sa.bindparam("g_n"))
    .with_for_update(skip_locked=True)
    .cte("picked")
    .prefix_with("MATERIALIZED")
    for owned in (True, False)
}


def _group_claim(picked: Any) -> Any:
    claimed = (
        sa.update(tasks_table)
        .where(sa.literal_column("tasks.ctid") == picked.c.tid, tasks_table.c.id == picked.c.id)
        .values(**_CLAIMED)
        .returning(*tasks_table.columns)
        .cte("claimed")
    )
    columns = [claimed.c[name] for name in _TASK_COLUMNS]
    return sa.select(picked.c.id, *columns).select_from(picked.outerjoin(claimed, claimed.c.id == picked.c.id))


_CLAIM_GROUP_HEAD = {owned: _group_claim(picked) for owned, picked in _GROUP_PICKED.items()}
_CLAIMED_TASKS = sa.select(tasks_table).where(tasks_table.c.id.in_(sa.bindparam("ids", expanding=True)))

# PostgreSQL, a write of task ends (final writes only: `PendingEnds`) as ONE statement run in autocommit, alone or
# with the one-group claim of the pass its ends call for: a transaction of its own was BEGIN, an UPDATE per end (or
# an executemany), the claim and COMMIT, each a round trip to the database (~25 us of the store writer's CPU and ~20
# of PostgreSQL's each, on a busy machine), 4.4 a transaction in bench_multi_server's two servers. Each end is an
# UPDATE of its own in the statement (a CTE: `_progress_update(final=True, held=True)` with the values cast to the
# columns' types), found by its id as that one is: one UPDATE ... FROM a VALUES list, planned (and its plan kept by
# psycopg's prepared statement) while the table was small and its statistics stale, joined the list to a scan of
# the whole table (PostgreSQL's CPU a task up by a third in a micro-run). In id order, as `_write_progress`'s.
_PROGRESS_COLUMNS = ("current_stage", "estimated_completion_at", "worker")  # `_progress_update`'s
_FINAL_COLUMNS = (  # and with final=True these too
    "status",
    "completed_at",
    "error_message",
    "error_details",
    "output",
    "stdout_tail",
    "stderr_tail",
    "trail",
)
_END_COLUMNS = _PROGRESS_COLUMNS + _FINAL_COLUMNS
_JSON_END_COLUMNS = frozenset(("error_details", "output", "trail"))
_PG_TYPES = {c.name: c.type.compile(dialect=postgresql.dialect()) for c in tasks_table.columns}
_NOT_FINAL = " AND ".join(f"tasks.status <> '{s.value}'" for s in sorted(FINAL_STATUSES, key=lambda s: s.value))
# Most ends one statement writes (`Store._ends_in_one`): 12 parameters an end, and PostgreSQL takes 65,535 a
# statement; more go in a transaction (`_write_progress`'s executemany), as before the one statement.
ENDS_IN_ONE_MAX = 32


def _end_cast(column: str) -> str:
    """The type an end's value is cast to: the column's, a VARCHAR unbounded (a cast to VARCHAR(n) cuts a longer
    value silently; the assignment to the column refuses it, "value too long", as a bound value is)."""
    pg_type = _PG_TYPES[column]
    return "VARCHAR" if pg_type.startswith("VARCHAR") else pg_type


@functools.lru_cache(maxsize=64)
def _ends_sql(n: int, owned: bool | None) -> str:
    """The ends of `n` tasks (parameters `e{i}_{column}` and `e{i}_id`, and `holder`: `_holder_pattern`), alone
    (`owned` None: a row per task written, its id) or with `_CLAIM_GROUP_HEAD[owned]`'s claim, on the condition that
    every task it picks is of the type `g_kind` (else it claims none). Then one row at least: the ids written (an
    array, NULL for a task not written, repeated), then each task picked, its type, and its row as claimed
    (`_TASK_COLUMNS`; NULLs where not claimed: another type picked, or the row changed by a transaction that
    committed after the statement began, as `_CLAIM_GROUP_HEAD`'s)."""
    ends = ", ".join(
        f"e{i} AS (UPDATE tasks SET "
        + ", ".join(f"{c} = CAST(%(e{i}_{c})s AS {_end_cast(c)})" for c in _END_COLUMNS)
        + f" WHERE tasks.id = CAST(%(e{i}_id)s AS {_PG_TYPES['id']}) AND tasks.worker LIKE %(holder)s ESCAPE '/'"
        + f" AND {_NOT_FINAL} RETURNING tasks.id)"
        for i in range(n)
    )
    if owned is None:
        return f"WITH {ends} " + " UNION ALL ".join(f"SELECT id FROM e{i}" for i in range(n))
    owner = "tasks.owner = CAST(%(g_owner)s AS VARCHAR)" if owned else "tasks.owner IS NULL"
    claimed = ", ".join(f"claimed.{c}" for c in _TASK_COLUMNS)
    written = ", ".join(f"(SELECT id FROM e{i})" for i in range(n))
    # The pick waits for the ends (a condition on them all, a one-time filter PostgreSQL evaluates before it reads a
    # row): while an end's row is locked elsewhere (a lease renewal, a take-over), the queued rows are not locked
    # yet, and other servers claim them meanwhile.
    after_ends = " UNION ALL ".join(f"SELECT id FROM e{i}" for i in range(n))
    return (
        f"WITH {ends}, "
        "picked AS MATERIALIZED (SELECT tasks.id, tasks.ctid AS tid, tasks.type FROM tasks"
        f" WHERE tasks.status = 'QUEUED' AND tasks.priority = CAST(%(g_priority)s AS INTEGER) AND {owner}"
        f" AND (SELECT count(*) FROM ({after_ends}) AS ended) >= 0"
        " ORDER BY tasks.created_at, tasks.id LIMIT %(g_n)s FOR UPDATE SKIP LOCKED), "
        "claimed AS (UPDATE tasks SET status = 'RUNNING', worker = CAST(%(b_worker)s AS VARCHAR),"
        " started_at = CAST(%(b_started_at)s AS FLOAT), lease_expires_at = CAST(%(b_lease)s AS FLOAT)"
        " FROM picked WHERE tasks.ctid = picked.tid AND tasks.id = picked.id"
        " AND NOT EXISTS (SELECT FROM picked AS other WHERE other.type <> CAST(%(g_kind)s AS VARCHAR))"
        f" RETURNING {', '.join(f'tasks.{c}' for c in _TASK_COLUMNS)}) "
        f"SELECT e.ids, p.id, p.type, {claimed} FROM (SELECT ARRAY[{written}] AS ids) AS e"
        " LEFT JOIN (picked AS p LEFT JOIN claimed ON claimed.id = p.id) ON true"
    )


def _ends_params(writes: Sequence[ProgressWrite], holder: str) -> dict[str, Any]:
    """`_ends_sql`'s parameters for `writes` (final ones, in id order): JSON as `sa.JSON(none_as_null=True)` binds it
    (json.dumps; None is SQL NULL)."""
    params: dict[str, Any] = {"holder": _holder_pattern(holder)}
    for i, write in enumerate(writes):
        task = write.task
        params[f"e{i}_id"] = task.id
        values = {
            "current_stage": task.current_stage,
            "estimated_completion_at": task.estimated_completion_at,
            "worker": task.worker,
            "status": task.status.value,
            "completed_at": task.completed_at,
            "error_message": task.error_message,
            "error_details": task.error_details,
            "output": task.output,
            "stdout_tail": task.stdout_tail,
            "stderr_tail": task.stderr_tail,
            "trail": _trail(write.stages, write.samples),
        }
        for column, value in values.items():
            if column in _JSON_END_COLUMNS and value is not None:
                value = json.dumps(value)
            params[f"e{i}_{column}"] = value
    return params


class _PlanChanged(Exception):
    """claim_planned: the first round claimed tasks the plan, made again without those gone, would not start."""


CLAIM_ROUNDS = 4  # most rounds (a statement each) claim_planned follows a changing plan for; the third is rare


@dataclass(frozen=True)
class TaskFilter:
    """The filters every task listing accepts (MCP tool, resource, REST): one definition for all."""

    statuses: tuple[TaskStatus, ...] = ()
    types: tuple[str, ...] = ()
    since: float | None = None
    owner: str | None = None
    # Only what a non-admin caller with this owner may see: its own work and anything not owned by
    # another API key (security/identity.py, Principal.sees_owner, is the same rule). None: everything.
    viewer: str | None = None
    batch_id: str | None = None  # only the tasks of this batch
    before: float | None = None  # only tasks created before this time (since: at or after)

    def fingerprint(self) -> str:
        """A short digest that ties a cursor to the filter it was issued for."""
        return _fingerprint(self)


@functools.lru_cache(maxsize=256)
def _fingerprint(flt: TaskFilter) -> str:
    # Kept per filter: a page's cursor is checked and made on every call that pages.
    raw = json.dumps(
        [
            sorted(s.value for s in flt.statuses),
            sorted(flt.types),
            flt.since,
            flt.owner,
            flt.viewer,
            flt.batch_id,
            flt.before,
        ]
    ).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def encode_position(values: Sequence[Any], fingerprint: str) -> str:
    """An opaque cursor: a position in a listing (JSON scalars) tied to the filter it was issued for."""
    payload = json.dumps({"k": list(values), "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_position(cursor: str, fingerprint: str, size: int) -> list[Any]:
    """The position of a cursor this server issued for the same filter; InvalidArgument otherwise."""
    if len(cursor) > MAX_CURSOR_CHARS:  # refused before it is decoded (ours are far shorter)
        raise InvalidArgument(f"invalid cursor: {cursor_too_long(len(cursor))}")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        values, issued_for = payload["k"], payload["f"]
        if not isinstance(values, list) or len(values) != size:
            raise ValueError
    except Exception:
        raise InvalidArgument(
            "invalid cursor: pass back the next_cursor of a previous page unchanged, or omit it for the first page"
        ) from None
    if issued_for != fingerprint:
        raise InvalidArgument(
            "this cursor belongs to a listing with other filters: repeat the filters of the first page, "
            "or omit the cursor to start again"
        )
    return values


def encode_cursor(key: tuple[float, str], flt: TaskFilter) -> str:
    return encode_position(key, flt.fingerprint())


def decode_cursor(cursor: str, flt: TaskFilter) -> tuple[float, str]:
    """Turn an opaque cursor back into its position, refusing ones this server did not issue."""
    created, task_id = decode_position(cursor, flt.fingerprint(), 2)
    try:
        return float(created), str(task_id)
    except (TypeError, ValueError):
        raise InvalidArgument("invalid cursor: pass back the next_cursor of a previous page unchanged") from None


def default_db_url(data_dir: str | os.PathLike[str]) -> str:
    """The embedded SQLite database under a data directory (created if missing)."""
    path = Path(data_dir) / "plexus_mcp"
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'plexus.db'}"


# TCP keepalives (libpq's): a connection to a host that vanished (no reset sent) is found dead in about 25 s. Every
# connection to a PostgreSQL store has them: the engine's pool, the event relay's LISTEN connection.
KEEPALIVES: dict[str, int] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


@contextlib.contextmanager
def sqlite_lock_wait(conn: Connection, lock_wait: float | None) -> Iterator[None]:
    """SQLite, with `lock_wait` (seconds): `conn`'s busy timeout that long while the block runs (a write lock held by
    another connection fails a statement after it, not after SQLITE_BUSY_MS), set back before the connection goes
    back to the pool. Elsewhere, or without `lock_wait`, nothing (`postgres_lock_wait` inside the transaction)."""
    if lock_wait is None or conn.dialect.name != "sqlite":
        yield
        return
    raw: Any = conn.connection.dbapi_connection
    raw.execute(f"PRAGMA busy_timeout={max(1, round(lock_wait * 1000))}")
    try:
        yield
    finally:
        try:  # (a failure here must not hide the statement's, nor keep this wait in the pool)
            raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        except Exception:
            conn.invalidate()


def postgres_lock_wait(conn: Connection, lock_wait: float | None, *, statements: bool = False) -> None:
    """PostgreSQL, with `lock_wait` (seconds), in a transaction: a row or table lock held elsewhere fails a statement
    after that long (and with `statements`, a statement that runs longer), not after the store's statement timeout;
    both end with the transaction. Elsewhere, or without `lock_wait`, nothing (`sqlite_lock_wait` around it)."""
    if lock_wait is None or conn.dialect.name == "sqlite":
        return
    ms = max(1, round(lock_wait * 1000))
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
    if statements:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")


def make_engine(
    url: str, *, echo: bool = False, pool_size: int = 10, pool_timeout: float = 30.0, statement_timeout: float = 30.0
) -> Engine:
    """An engine on the store, with what every process using it needs on its database.

    SQLite: WAL, a busy timeout and foreign keys on every connection (_sqlite_pragmas). PostgreSQL (psycopg 3):
    a statement timeout and a connect timeout. No pre-ping (a round trip before every call, a third of a read's
    time): when the database restarts, the call that meets a closed connection fails and SQLAlchemy discards
    every pooled connection opened before, so the next calls reconnect. The pool holds at most `pool_size`
    connections; a call waits `pool_timeout` seconds for one.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):  # no driver named: psycopg 3 (the postgres extra)
        parsed = parsed.set(drivername="postgresql+psycopg")
    options: dict[str, Any] = {"echo": echo}
    in_memory = parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
    if not in_memory:  # an in-memory SQLite database is one connection, shared
        # Last in, first out: the loop's writes, one after another, reuse the connection whose page cache is warm
        # (first in, first out rotated through every pooled connection, each finding its cache stale after the
        # others' writes: the final UPDATE of a task took twice as long).
        options.update(pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout, pool_use_lifo=True)
    if parsed.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {"connect_timeout": max(1, round(pool_timeout)), **KEEPALIVES}
        if statement_timeout > 0:
            connect_args["options"] = f"-c statement_timeout={round(statement_timeout * 1000)}"
        options.update(connect_args=connect_args)
    try:
        engine = sa.create_engine(parsed, **options)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"the store {parsed.render_as_string(hide_password=True)} needs the database driver "
            f"{exc.name!r}: pip install 'plexus-mcp-jupyter[postgres]' (psycopg 3)"
        ) from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def add_missing_columns(conn: Connection, tables: Iterable[sa.Table]) -> list[str]:
    """Complete a store made by a release before migrations (migrations/__init__.py): add the nullable
    columns its tables lack, as those releases did at start.

    `create_all` creates missing tables but never alters existing ones, so a column those releases added
    (always nullable or with a server default) is added here with `ALTER TABLE ... ADD COLUMN`, which SQLite
    and PostgreSQL both support, committed one by one. Returns "table.column" for each column added.
    """
    added: list[str] = []
    for table in tables:
        if not sa.inspect(conn).has_table(table.name):
            continue
        present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable and column.server_default is None:
                raise RuntimeError(
                    f"cannot add the required column {table.name}.{column.name} to an existing store: "
                    "give it a server_default"
                )
            ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            name = conn.dialect.identifier_preparer.quote(table.name)
            conn.execute(sa.text(f"ALTER TABLE {name} ADD COLUMN {ddl}"))
            conn.commit()
            added.append(f"{table.name}.{column.name}")
    return added


def add_missing_indexes(conn: Connection, tables: Iterable[sa.Table]) -> None:
    """Create the indexes a release before migrations added to an existing table (`create_all` makes only
    new tables')."""
    for table in tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    conn.commit()


class Store:
    """Tasks, stages and progress samples in a relational database."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        pool_size: int = 10,
        pool_timeout: float = 30.0,
        statement_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.engine: Engine = make_engine(
            url, echo=echo, pool_size=pool_size, pool_timeout=pool_timeout, statement_timeout=statement_timeout
        )
        # Moves with every write this process makes to the store: what tells a kept listing page it may be stale.
        self.writes = WriteGeneration(self.engine, (tasks_table.name, stages_table.name))
        from ..migrations import upgrade_store  # the migrations import every module that defines a table

        # Reads need no transaction: on PostgreSQL, autocommit spares the BEGIN and ROLLBACK round trips around
        # every read (under READ COMMITTED each statement has its own snapshot either way). SQLite's driver
        # begins no transaction for a read.
        self.reads: Engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.engine.dialect.name == "postgresql"
            else self.engine
        )
        # The per-task writes run on the driver (_OnDriver), on SQLite and PostgreSQL; echoed statements
        # (debugging) all go through SQLAlchemy, which logs them.
        self._on_driver: dict[Any, _OnDriver] | None = (
            {} if self.engine.dialect.name in ("sqlite", "postgresql") and not echo else None
        )
        self._positional = bool(self.engine.dialect.positional)  # SQLite's qmark, PostgreSQL's (psycopg) pyformat
        try:
            upgrade_store(self.engine, self.safe_url)
        except BaseException:
            self.engine.dispose()
            raise
        database = self.engine.url.database
        self._checkpointer = (
            _Checkpointer(self.engine)
            if self.engine.dialect.name == "sqlite" and database not in (None, "", ":memory:")
            else None
        )

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for logs and health output."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True

    # -- tasks ---------------------------------------------------------------------------------

    def create_task(self, task: Task, *, also: Callable[[Connection], None] | None = None) -> None:
        """Insert a new task (`create_tasks` of one; the manager stores its creates in groups, `create_group`);
        `also` writes in the same transaction what must exist with it (its record)."""
        self.create_tasks([task], also=also)

    def rehearse_create_task(
        self,
        task: Task,
        *,
        also: Callable[[Connection], None] | None = None,
        holder: str | None = None,
        lock_wait: float | None = None,
    ) -> None:
        """`create_task`'s statements, executed and rolled back: nothing is stored, and they are compiled and in
        the engine's cache (and a connection opened) before the first real one (the warm-up after start). With
        `holder` (the manager's server id), also the task's claim, a progress write with a stage and a sample,
        and its final write: on SQLite each statement is compiled on first use, on the event loop. Last, the task
        is read back with its stages. With `lock_wait` (seconds), a lock held elsewhere (SQLite: another
        connection's write transaction; PostgreSQL: a row or table lock) or a statement that hangs fails it after
        that long, not after the store's own timeouts (5 s, 30 s): a rehearsal is worth no wait."""
        with self.engine.connect() as conn, sqlite_lock_wait(conn, lock_wait):
            transaction = conn.begin()
            try:
                postgres_lock_wait(conn, lock_wait, statements=True)
                self._insert_task(conn, task, also)
                if holder is not None:
                    now, worker = time.time(), f"{holder}/pid=0"
                    self._claim_many(conn, Claim([task.id], worker, now, now + 60))
                    running = dataclasses.replace(task, worker=worker)
                    stage = Stage("Warm-up", 0, StageStatus.RUNNING, started_at=now)
                    sample = ProgressSample(now, stage.name, 0, None)
                    writes = [ProgressWrite(running, [stage], [sample]), ProgressWrite(running, [], [], final=True)]
                    self._write_progress(conn, writes, holder=holder)
                # The read that answers a create (the task and its stages): the stages' select is compiled only
                # when a task is found (~1 ms of the first create_evaluation, in the store calls' thread it awaits).
                self._tasks_by_ids(conn, [task.id], stages=True)
            finally:
                transaction.rollback()

    def _insert_task(self, conn: Connection, task: Task, also: Callable[[Connection], None] | None) -> None:
        self._insert_tasks(conn, [task], [also])

    def _insert_tasks(
        self, conn: Connection, tasks: Sequence[Task], also: Sequence[Callable[[Connection], None] | None]
    ) -> None:
        """`tasks`' rows in one driver executemany of the prebuilt insert (building one per call cost more), their
        stages, then each one's `also`."""
        self._many(conn, _INSERT_TASK, [_task_row(task) for task in tasks])
        stages = [_stage_row(task.id, stage) for task in tasks for stage in task.stages]
        if stages:
            conn.execute(sa.insert(stages_table), stages)
        for write in also:
            if write is not None:
                write(conn)

    def create_group(self, tasks: Sequence[Task], also: Sequence[Callable[[Connection], None] | None]) -> None:
        """The tasks of concurrent dispatches (core/creates.py: single ones and batches) in one transaction, their
        rows in one driver executemany, then each write of `also` (the creates' records: one per create)."""
        with self.engine.begin() as conn:
            self._insert_tasks(conn, tasks, also)

    def create_tasks(self, tasks: Sequence[Task], *, also: Callable[[Connection], None] | None = None) -> None:
        """Insert new tasks (and any stages they hold) in one transaction, on the driver (`_insert_tasks`: its
        executemany, without SQLAlchemy's work per row): a batch is all there or not at all, and a thousand rows
        cost one commit. `also` writes in the same transaction what must exist with them (the records of internal
        types: an evaluation's)."""
        if tasks:
            with self.engine.begin() as conn:
                self._insert_tasks(conn, tasks, [also])

    def tasks_by_ids(self, ids: Sequence[str], *, stages: bool = False) -> list[Task]:
        """The tasks with these ids that exist (with their stages if `stages`), in no particular order."""
        with self.reads.connect() as conn:
            return self._tasks_by_ids(conn, ids, stages)

    def _tasks_by_ids(self, conn: Connection, ids: Sequence[str], stages: bool) -> list[Task]:
        t = tasks_table
        out: list[Task] = []
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = list(ids[start : start + _IN_CHUNK])
            found = [_task_from_tuple(r) for r in conn.execute(sa.select(t).where(t.c.id.in_(chunk)))]
            if stages:
                by_task = self._stages_for(conn, [task.id for task in found])
                for task in found:
                    task.stages = _merged_stages(task.stages, by_task.get(task.id, []))
            out += found
        return out

    def retries_of(self, ids: Sequence[str]) -> dict[str, str]:
        """For those of `ids` that were retried: the id of a newer attempt of each."""
        t = tasks_table
        out: dict[str, str] = {}
        with self.reads.connect() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = list(ids[start : start + _IN_CHUNK])
                out.update(
                    (r[0], r[1]) for r in conn.execute(sa.select(t.c.retry_of, t.c.id).where(t.c.retry_of.in_(chunk)))
                )
        return out

    def update_queued(self, ids: Sequence[str], **values: Any) -> list[str]:
        """Set columns of those of `ids` that are still QUEUED, in one transaction; returns
        their ids. The status condition is in the UPDATE itself, so a task the scheduler claimed meanwhile
        is left alone (and reported as not updated)."""
        t = tasks_table
        values = {k: (v.value if isinstance(v, TaskStatus) else v) for k, v in values.items()}
        waiting = [TaskStatus.QUEUED.value]
        updated: list[str] = []
        with self.engine.begin() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = list(ids[start : start + _IN_CHUNK])
                query = (
                    sa.update(t).where(t.c.id.in_(chunk), t.c.status.in_(waiting)).values(**values).returning(t.c.id)
                )
                updated += [r[0] for r in conn.execute(query)]
        return updated

    def batch_counts(self, batch_id: str, viewer: str | None = None) -> tuple[dict[str, int], int]:
        """Counts by status of the current attempts in a batch (a task that was retried counts through its
        newest attempt), and how many attempts were superseded by a retry. With `viewer`, only what that
        caller may see."""
        t = tasks_table
        retried = sa.select(t.c.retry_of).where(t.c.batch_id == batch_id, t.c.retry_of.is_not(None))
        where = [t.c.batch_id == batch_id]
        if viewer is not None:
            where.append(visible_to(t.c.owner, viewer))
        current = sa.select(t.c.status, sa.func.count()).where(*where, t.c.id.notin_(retried)).group_by(t.c.status)
        superseded = sa.select(sa.func.count()).select_from(t).where(*where, t.c.id.in_(retried))
        with self.reads.connect() as conn:
            counts = {status: int(n) for status, n in conn.execute(current)}
            return counts, int(conn.execute(superseded).scalar_one())

    def batch_items(self, batch_id: str, viewer: str | None = None) -> tuple[int, int, float | None, float | None]:
        """Items processed and known in all stages of a batch's current attempts, when its first task was
        created and when its last task ended (None while one has not)."""
        t, st = tasks_table, stages_table
        retried = sa.select(t.c.retry_of).where(t.c.batch_id == batch_id, t.c.retry_of.is_not(None))
        where = [t.c.batch_id == batch_id, t.c.id.notin_(retried)]
        if viewer is not None:
            where.append(visible_to(t.c.owner, viewer))
        items = (  # the tasks whose stages are all rows of task_stages
            sa.select(
                sa.func.coalesce(sa.func.sum(st.c.processed_items), 0),
                sa.func.coalesce(sa.func.sum(st.c.total_items), 0),
            )
            .select_from(st.join(t, st.c.task_id == t.c.id))
            .where(*where, _NO_TRAIL)
        )
        # The ended ones whose final write carried stages (tasks.trail): merged with their rows, if any, here.
        trailed = sa.select(t.c.id, t.c.trail).where(*where, sa.not_(_NO_TRAIL))
        times = sa.select(sa.func.min(t.c.created_at), sa.func.max(t.c.completed_at)).where(*where)
        with self.reads.connect() as conn:
            processed, total = conn.execute(items).one()
            trails = {i: _stages_from_trail(i, trail) for i, trail in conn.execute(trailed)}
            rows: dict[str, list[Stage]] = {}
            if trails:
                their_rows = sa.select(st).join(t, st.c.task_id == t.c.id).where(*where, sa.not_(_NO_TRAIL))
                for r in conn.execute(their_rows):
                    rows.setdefault(r[0], []).append(_stage_from_tuple(r))
            created, ended = conn.execute(times).one()
        for task_id, carried in trails.items():
            stages = _merged_stages(carried, rows.get(task_id, []))
            processed += sum(stage.processed_items for stage in stages)
            total += sum(stage.total_items or 0 for stage in stages)
        return int(processed), int(total), created, ended

    def get_task(self, task_id: str) -> Task | None:
        """One task with its stages, in one statement (one round trip to a networked database)."""
        with self.reads.connect() as conn:
            rows = conn.execute(_SELECT_TASK_WITH_STAGES, {"task_id": task_id}).all()
        if not rows:
            return None
        task = _task_from_tuple(rows[0][:_N_TASK_COLUMNS])
        table = [_stage_from_tuple(r[_N_TASK_COLUMNS:]) for r in rows if r[_N_TASK_COLUMNS] is not None]
        task.stages = _merged_stages(task.stages, table)
        return task

    def list_tasks(
        self, flt: TaskFilter, *, limit: int, after: tuple[float, str] | None = None
    ) -> tuple[list[Task], tuple[float, str] | None]:
        """One page of tasks, newest first, and the key to continue after (None on the last page)."""
        query = _list_query(
            len(flt.statuses),
            len(flt.types),
            flt.since is not None,
            flt.owner is not None,
            after is not None,
            flt.viewer is not None,
            flt.batch_id is not None,
            flt.before is not None,
        )
        params: dict[str, Any] = {"limit": limit + 1}
        for i, status in enumerate(flt.statuses):
            params[f"status_{i}"] = status.value
        for i, type_ in enumerate(flt.types):
            params[f"type_{i}"] = type_
        if flt.since is not None:
            params["since"] = flt.since
        if flt.owner is not None:
            params["owner"] = flt.owner
        if flt.viewer is not None:
            params["viewer"] = flt.viewer
        if flt.batch_id is not None:
            params["batch_id"] = flt.batch_id
        if flt.before is not None:
            params["before"] = flt.before
        if after is not None:
            params["after_created"], params["after_id"] = after
        with self.reads.connect() as conn:
            rows = conn.execute(query, params).all()
            page = [_task_from_tuple(r) for r in rows[:limit]]
            stages = self._stages_for(conn, [task.id for task in page])
        for task in page:
            task.stages = _merged_stages(task.stages, stages.get(task.id, []))
        next_key = (page[-1].created_at, page[-1].id) if len(rows) > limit else None
        return page, next_key

    def count_tasks(self, flt: TaskFilter) -> int:
        query = sa.select(sa.func.count()).select_from(tasks_table).where(*_filter_clauses(flt))
        with self.reads.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def counts_by_status(self) -> dict[str, int]:
        t = tasks_table
        with self.reads.connect() as conn:
            rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
        return {status: int(n) for status, n in rows}

    def counts_by_status_and_type(self) -> dict[tuple[str, str], int]:
        """Tasks by (status, type): what the service metrics report. A scan of the tasks' status and type
        index: call it off the event loop."""
        t = tasks_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.status, t.c.type, sa.func.count()).group_by(t.c.status, t.c.type)).all()
        return {(status, type_): int(n) for status, type_, n in rows}

    def find_task_ids(self, flt: TaskFilter, *, limit: int) -> list[str]:
        t = tasks_table
        query = sa.select(t.c.id).where(*_filter_clauses(flt)).order_by(t.c.created_at).limit(limit)
        with self.reads.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def tasks_with_status(self, status: TaskStatus) -> list[Task]:
        """Every task with this status, with its stages."""
        with self.reads.connect() as conn:
            rows = conn.execute(sa.select(tasks_table).where(tasks_table.c.status == status.value)).mappings()
            tasks = [_task_from_row(r) for r in rows]
            stages = self._stages_for(conn, [t.id for t in tasks])
        for task in tasks:
            task.stages = _merged_stages(task.stages, stages.get(task.id, []))
        return tasks

    def claim(self, task_id: str, *, worker: str, started_at: float, lease_expires_at: float | None = None) -> bool:
        """Move a QUEUED task to RUNNING if nobody else did: safe with several servers on one store. One
        conditional UPDATE (status still QUEUED) sets the claimant and its lease (core/leases.py); exactly one
        server gets rowcount 1."""
        return bool(self.claim_many([task_id], worker=worker, started_at=started_at, lease_expires_at=lease_expires_at))

    def claim_many(
        self, task_ids: Sequence[str], *, worker: str, started_at: float, lease_expires_at: float | None = None
    ) -> set[str]:
        """`claim` for the starts of one scheduling pass, in one transaction (a commit costs more than the
        updates); returns the ids this call moved to RUNNING (another server may have taken the others)."""
        if not task_ids:
            return set()
        with self.engine.begin() as conn:
            return self._claim_many(conn, Claim(task_ids, worker, started_at, lease_expires_at))

    def claim_planned(
        self,
        plan: Callable[[set[str]], Sequence[str]],
        *,
        worker: str,
        started_at: float,
        lease_expires_at: float | None = None,
        order: Sequence[str] = (),
        conn: Connection | PendingEnds | None = None,
    ) -> tuple[list[str], set[str], set[str]]:
        """Claim the starts of one scheduling pass, planned against what is really still claimable: several
        servers planning from the same head of a shared queue then claim DIFFERENT tasks, with no claim lost
        and no read of the queue again.

        `plan(gone)` returns the ids to start when the tasks in `gone` are left out (the manager's plan of the
        queue's head it read, core/queue.py: fair shares, caps and resources stay its rules). In one transaction,
        the planned starts are taken: on PostgreSQL locked if still QUEUED (`SELECT ... FOR UPDATE SKIP LOCKED`:
        a row another server is claiming right now is skipped at once, never waited for), on SQLite claimed at
        once (a conditional UPDATE: the transaction then holds SQLite's one write lock, so no other server claims
        until it commits). The planned tasks not taken are `gone` (claimed or cancelled, or being claimed by
        another server) and the pass is planned again without them, taking only what the new plan adds, until
        every planned start is taken, at most CLAIM_ROUNDS rounds. What it claims is always a subset of one plan,
        which caps and resources allow: on PostgreSQL the last plan's locked starts (one UPDATE claims them); on
        SQLite, where a round's claims are already made, a new plan is followed only if it keeps them all.

        `order`: the plan's start order (the queue's head the plan read, as it would start them). On PostgreSQL the
        first round then CLAIMS, in one statement, the first as many of them as the plan starts that are still
        QUEUED and not being claimed (`_CLAIM_FIRST_QUEUED`: probed in their order, `LIMIT`, `SKIP LOCKED`, the
        job-queue idiom), and every task of the order before the last one claimed is known gone: servers planning
        from one head take its successive free tasks in one statement each. If the plan made without those gone
        would not start all it claimed (an owner cap, a resource), that transaction is undone and the rounds above
        follow the plan instead.

        `conn`: a transaction to claim in (the write whose ends call for this pass: one commit for both,
        `save_progress_then`); the undone first round's claims are then put back as they were, QUEUED (their
        rows stay locked by it until it ends), instead of rolled back.

        Returns (the ids planned to start, those this call moved to RUNNING, those found gone)."""
        first = list(plan(set()))
        if not first:
            return [], set(), set()
        if isinstance(conn, PendingEnds):
            conn = conn.transaction()
        postgres = self.engine.dialect.name == "postgresql"
        values = {"b_worker": worker, "b_started_at": started_at, "b_lease": lease_expires_at}
        if postgres and order:
            try:
                with contextlib.nullcontext(conn) if conn is not None else self.engine.begin() as in_tx:
                    got = self._rows(in_tx, _CLAIM_FIRST_QUEUED, {**values, "order": list(order), "n": len(first)})
                    claimed = self._claimed_first(in_tx, got, values)
                    last = max((order.index(task_id) for task_id in claimed), default=len(order) - 1)
                    examined = order if len(claimed) < len(first) else order[: last + 1]
                    gone = {task_id for task_id in examined if task_id not in claimed}
                    ids = list(plan(gone)) if gone else first
                    if claimed <= set(ids):
                        return self._claim_rounds(in_tx, plan, ids, claimed, gone, values)
                    if conn is None:
                        raise _PlanChanged  # undone: the claims below follow the plan round by round
                    conn.execute(_UNCLAIM, {"ids": sorted(claimed)})
            except _PlanChanged:
                pass
        with contextlib.nullcontext(conn) if conn is not None else self.engine.begin() as in_tx:
            return self._claim_rounds(in_tx, plan, first, set(), set(), values)

    def claim_group_head(
        self,
        group: tuple[int, str | None],
        n: int,
        accept: Callable[[list[Task]], bool],
        *,
        worker: str,
        started_at: float,
        lease_expires_at: float | None = None,
        conn: Connection | PendingEnds | None = None,
        kind: str | None = None,
    ) -> list[Task] | None:
        """PostgreSQL: claim the first `n` QUEUED tasks of one (priority, owner) `group`, in its order, without a
        read of the queue: a scheduling pass of a server that knows the queue holds that group alone. A task another
        server is claiming is skipped (`SKIP LOCKED`), never waited for. The claims stand only if `accept(tasks)`
        (the manager's plan of them starts them all: caps and resources stay its rules); else they are put back
        QUEUED in the transaction (their rows stay locked by it until it ends) and None is returned: the caller
        plans from a read of the queue instead. Returns the tasks claimed, as they were before the claim (fewer than
        `n` when the group has no more free tasks). `conn`: a transaction to claim in (`save_progress_then`).

        `kind`: a type whose tasks `accept` takes, whatever they are. With `conn` a write of ends not made yet
        (`PendingEnds`), the write and a claim of tasks all of that type are then ONE statement, in autocommit: what
        it claims is committed when this returns (it never asks `accept`); when it picks a task of another type, it
        claims none and the claim is made as without `kind`, in a transaction."""
        if n <= 0:
            return []
        priority, owner = group
        values = {"b_worker": worker, "b_started_at": started_at, "b_lease": lease_expires_at}
        if isinstance(conn, PendingEnds):
            if kind is not None and conn.lost is None:
                got = self._ends_and_group_head(conn, group, n, kind, values)
                if got is not None:
                    return got
            conn = conn.transaction()
        with contextlib.nullcontext(conn) if conn is not None else self.engine.begin() as in_tx:
            rows = self._rows(
                in_tx,
                _CLAIM_GROUP_HEAD[owner is not None],
                {**values, "g_priority": priority, "g_owner": owner, "g_n": n},
            )
            tasks = [_task_from_tuple(row[1:]) for row in rows if row[1] is not None]
            missed = [row[0] for row in rows if row[1] is None]
            if missed:  # changed by a transaction that committed after the statement began: claimed by id
                again = set(in_tx.execute(_CLAIM_LOCKED, {**values, "ids": missed}).scalars())
                if again:
                    tasks += [_task_from_tuple(row) for row in in_tx.execute(_CLAIMED_TASKS, {"ids": sorted(again)})]
                    tasks.sort(key=lambda task: (task.created_at, task.id))
            for task in tasks:  # as the queue showed it (the caller marks its claims: `TaskManager._mark_claimed`)
                task.status, task.worker, task.started_at, task.lease_expires_at = TaskStatus.QUEUED, None, None, None
            if tasks and not accept(tasks):
                in_tx.execute(_UNCLAIM, {"ids": [task.id for task in tasks]})
                return None
            return tasks

    @staticmethod
    def _claimed_first(conn: Connection, picked: list[tuple[Any, ...]], values: dict[str, Any]) -> set[str]:
        """The tasks `_CLAIM_FIRST_QUEUED` claimed, from its rows (each task it locked, and whether its UPDATE by
        address claimed it): those it locked at a version its snapshot does not see (changed, still QUEUED, by a
        transaction that committed after it began) are claimed here by their id (rare; still QUEUED under the
        lock), not left QUEUED and reported gone."""
        claimed = {task_id for task_id, updated in picked if updated}
        missed = [task_id for task_id, updated in picked if not updated]
        if missed:
            claimed |= set(conn.execute(_CLAIM_LOCKED, {**values, "ids": missed}).scalars())
        return claimed

    def _claim_rounds(
        self,
        conn: Connection,
        plan: Callable[[set[str]], Sequence[str]],
        ids: list[str],
        claimed: set[str],
        gone: set[str],
        values: dict[str, Any],
    ) -> tuple[list[str], set[str], set[str]]:
        """`claim_planned`'s rounds in `conn`'s transaction: take (PostgreSQL: lock; SQLite: claim) the planned
        `ids` not taken yet, plan again without those gone, until all are taken; then claim what is only locked.
        `claimed`: what this transaction already claimed (kept: a new plan is followed only if it keeps them)."""
        postgres = self.engine.dialect.name == "postgresql"
        taken = set(claimed)
        for _ in range(CLAIM_ROUNDS):
            todo = [task_id for task_id in ids if task_id not in taken]
            if not todo:
                break
            if postgres:
                got = set(conn.execute(_LOCK_QUEUED, {"ids": todo}).scalars())
            else:
                got = self._claim_many(conn, Claim(todo, values["b_worker"], values["b_started_at"], values["b_lease"]))
                claimed |= got
            taken |= got
            if len(got) == len(todo):
                break
            gone |= {task_id for task_id in todo if task_id not in got}
            again = list(plan(gone))
            if not claimed <= set(again):
                break  # what this transaction claimed is kept: a subset of the previous plan
            ids = again
        ids = [task_id for task_id in ids if task_id in taken]
        rest = [task_id for task_id in ids if task_id not in claimed]
        if rest:
            claimed |= set(conn.execute(_CLAIM_LOCKED, {**values, "ids": rest}).scalars())
        return ids, claimed, gone

    def _claim_many(self, conn: Connection, claim: Claim) -> set[str]:
        task_ids = claim.task_ids
        rows = [
            {"b_id": task_id, "b_worker": claim.worker, "b_started_at": claim.started_at, "b_lease": claim.lease}
            for task_id in task_ids
        ]
        if self.engine.dialect.name == "postgresql":
            return {
                task_id
                for task_id, row in zip(task_ids, rows, strict=True)
                if conn.execute(_CLAIM_SKIP_LOCKED, row).rowcount == 1
            }
        # SQLite: one statement for all (its rowcount is the sum); when some were taken meanwhile, the rows this
        # transaction claimed are the ones that now carry its worker and start time.
        if self._many(conn, _CLAIM, rows) == len(rows):
            return set(task_ids)
        t = tasks_table
        won = t.c.id.in_(task_ids), t.c.worker == claim.worker, t.c.started_at == claim.started_at
        return set(conn.execute(sa.select(t.c.id).where(*won)).scalars())

    # -- leases (core/leases.py) ---------------------------------------------------------------

    def renew_leases(self, server_id: str, until: float) -> int:
        """Extend the lease of every RUNNING task this server claimed (its `worker` starts with the server id)
        to `until`, in one statement; returns how many it holds."""
        t = tasks_table
        # Rows locked in id order, skipping those another transaction holds (the manager's batched write of the
        # same tasks): a lease skipped once is renewed at the next heartbeat, long before it runs out, and the
        # two never deadlock on PostgreSQL (SQLite has no row locks: FOR UPDATE is left out there).
        mine = (
            sa.select(t.c.id)
            .where(t.c.status == TaskStatus.RUNNING.value, t.c.worker.startswith(server_id, autoescape=True))
            .order_by(t.c.id)
            .with_for_update(skip_locked=True)
        )
        query = sa.update(t).where(t.c.id.in_(mine.scalar_subquery())).values(lease_expires_at=until)
        with self.engine.begin() as conn:
            return int(conn.execute(query).rowcount)

    def expired_lease_count(self, server_id: str, at: float) -> int:
        """How many RUNNING tasks of other servers have a lease that ended before `at` (their server is gone)."""
        t = tasks_table
        query = (
            sa.select(sa.func.count())
            .select_from(t)
            .where(
                t.c.status == TaskStatus.RUNNING.value,
                t.c.lease_expires_at < at,
                sa.not_(t.c.worker.startswith(server_id, autoescape=True)),
            )
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def take_over(
        self,
        task_id: str,
        *,
        previous: str | None,
        worker: str,
        lease_expires_at: float | None,
        requeue: bool = False,
        final: ProgressWrite | None = None,
    ) -> bool:
        """Make this server the holder of a RUNNING task another (gone) server held, if no other server did
        first: one conditional UPDATE (still RUNNING, still held by `previous`) that only one server can win.
        The winner resolves the task (TaskManager.recover) in the same transaction: `requeue` it, or write its
        end (`final`). When the resolution fails, the take-over is undone with it: the task is never left
        RUNNING held by a live server, whose heartbeat would keep it so for ever."""
        t = tasks_table
        held_by = t.c.worker.is_(None) if previous is None else t.c.worker == previous
        query = (
            sa.update(t)
            .where(t.c.id == task_id, t.c.status == TaskStatus.RUNNING.value, held_by)
            .values(worker=worker, lease_expires_at=lease_expires_at)
        )
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount != 1:
                return False
            if requeue:
                _requeue(conn, task_id, holder=None)
            elif final is not None:
                self._write_progress(conn, [final], holder=worker)
        return True

    def requeue(self, task_id: str, *, holder: str | None = None) -> bool:
        """Put a task back in the queue as if it had never started (its stages and history go); with `holder`
        (a server id), only while that server holds it. True when it was re-queued."""
        with self.engine.begin() as conn:
            return _requeue(conn, task_id, holder=holder)

    def update_task(self, task_id: str, *, only_if_status: Sequence[TaskStatus] = (), **values: Any) -> bool:
        """Set columns of one task; with only_if_status, only while it has one of those statuses."""
        t = tasks_table
        values = {k: (v.value if isinstance(v, TaskStatus) else v) for k, v in values.items()}
        query = sa.update(t).where(t.c.id == task_id).values(**values)
        if only_if_status:
            query = query.where(t.c.status.in_([s.value for s in only_if_status]))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def cancel_requested_ids(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        if not ids:
            return set()
        t = tasks_table
        with self.reads.connect() as conn:
            rows = conn.execute(sa.select(t.c.id).where(t.c.id.in_(ids), t.c.cancel_requested.is_(True)))
            return {r[0] for r in rows}

    def save_progress(
        self,
        task: Task,
        *,
        stages: Iterable[Stage] = (),
        sample: ProgressSample | None = None,
        final: bool = False,
    ) -> None:
        """Write a task's progress columns, the given stages and a sample, in one transaction (see save_progress_many).

        A final write (completion, failure, cancellation) also stores status, output and errors,
        and never overwrites a task that is already final.
        """
        self.save_progress_many([ProgressWrite(task, list(stages), [sample] if sample else [], final)])

    def save_progress_many(
        self, writes: Sequence[ProgressWrite], *, holder: str | None = None, claim: Claim | None = None
    ) -> set[str]:
        """Write the progress (and, for final ones, the end) of many tasks in ONE transaction.

        The manager gathers what its workers reported during one turn of the event loop (stage changes with
        the worker ids, progress, ends of many tasks) and writes it here at once: a commit and a statement per
        kind of row, instead of a transaction per message, which was most of a small task's cost on the server.
        A final write's stages and samples go in the task's row (`tasks.trail`), not in the child tables.

        With `holder` (a server id), a task is written only while that server holds it (its `worker` starts
        with the id): another server that took it over (this one's lease ran out, core/leases.py) owns the row
        now. Returns the ids of the tasks left unwritten for that reason.

        `claim`: the next scheduling pass's claims (`claim_many`), in the same transaction: the tasks ending in
        this write free the slots those take, so a small task's end and its successor's start cost one commit.
        What it won is in `claim.won` once this returns.
        """
        if not writes and claim is None:
            return set()
        if claim is None and holder is not None and self._ends_in_one(writes):
            writes = sorted(writes, key=lambda w: w.task.id)
            ids = self._ends_alone(writes, holder)
            return self._unwritten_elsewhere(writes, ids, holder)
        with self.engine.begin() as conn:
            lost = self._write_progress(conn, writes, holder=holder) if writes else set()
            if claim is not None:
                claim.won = self._claim_many(conn, claim) if claim.task_ids else set()
            return lost

    def save_progress_then(
        self,
        writes: Sequence[ProgressWrite],
        *,
        holder: str | None,
        then: Callable[[Connection | PendingEnds], Any],
    ) -> tuple[set[str], Any]:
        """`save_progress_many(writes, holder=)`, then `then(conn)` in the same transaction: on a networked store,
        the claim of the scheduling pass the write's ends call for (`Store.claim_planned(conn=)`; a queue read it
        needs goes on a connection of its own), one commit for both instead of two. Returns the tasks left
        unwritten and what `then` returned; when `then` fails, the write is made again alone (the transaction was
        undone) and the exception is returned instead.

        PostgreSQL, a write of ends alone (final writes only, the common write of small tasks): `then` gets the
        write not made yet (`PendingEnds`). A one-group claim (`claim_group_head(kind=)`) makes both in one
        statement in autocommit (no BEGIN, COMMIT or statement per end: one round trip to the database instead of
        four or five); any other claim opens the transaction and makes the write in it first, as above; a pass
        that claims nothing leaves the write alone, one statement. A `then` that fails after the one statement
        committed hands its exception back with the write standing (not made again)."""
        failed: Exception | None = None
        if holder is not None and self._ends_in_one(writes):
            ends: PendingEnds | None = None
            try:
                with contextlib.ExitStack() as stack:
                    ends = PendingEnds(self, writes, holder, stack)
                    try:
                        done = then(ends)
                    except Exception as exc:
                        failed = exc
                        raise
                    if ends.lost is None:  # the pass used no transaction: the write alone
                        ends.written(self._ends_alone(ends.writes, holder))
                    assert ends.lost is not None
                    return ends.lost, done
            except Exception:
                if failed is None:
                    raise
            if ends is not None and ends.committed and ends.lost is not None:  # the write stands: not made again
                return ends.lost, failed
            return self.save_progress_many(writes, holder=holder), failed
        try:
            with self.engine.begin() as conn:
                lost = self._write_progress(conn, writes, holder=holder) if writes else set()
                try:
                    return lost, then(conn)
                except Exception as exc:
                    failed = exc
                    raise
        except Exception:
            if failed is None:
                raise
        return self.save_progress_many(writes, holder=holder), failed

    def _ends_in_one(self, writes: Sequence[ProgressWrite]) -> bool:
        """Whether `writes` go in one statement of their own (`_ends_sql`): ends only, at most ENDS_IN_ONE_MAX,
        PostgreSQL on the driver."""
        return (
            0 < len(writes) <= ENDS_IN_ONE_MAX
            and self._on_driver is not None
            and self.engine.dialect.name == "postgresql"
            and all(write.final for write in writes)
        )

    def _ends_alone(self, writes: Sequence[ProgressWrite], holder: str) -> set[str]:
        """The ends of `writes` (final, in id order) in one statement in autocommit; the ids it wrote."""
        rows = self._autocommit_rows(_ends_sql(len(writes), None), _ends_params(writes, holder))
        return {row[0] for row in rows}

    def _ends_and_group_head(
        self, ends: PendingEnds, group: tuple[int, str | None], n: int, kind: str, values: dict[str, Any]
    ) -> list[Task] | None:
        """`claim_group_head` with a write of ends not made yet: both in one statement in autocommit (`_ends_sql`).
        The tasks claimed (committed), or None when the group's first `n` hold a task of another type than `kind`
        (none claimed; the ends are written either way)."""
        priority, owner = group
        params = _ends_params(ends.writes, ends.holder)
        params.update(values, g_priority=priority, g_owner=owner, g_n=n, g_kind=kind)
        rows = self._autocommit_rows(_ends_sql(len(ends.writes), owner is not None), params)
        claims = [row[1] for row in rows if row[1] is not None and row[3] is not None]  # committed
        try:
            ends.written(task_id for task_id in rows[0][0] if task_id is not None)
            picked = [row for row in rows if row[1] is not None]
            if any(row[2] != kind for row in picked):
                return None
            tasks = [_task_from_tuple(row[3:]) for row in picked if row[3] is not None]
            missed = [row[1] for row in picked if row[3] is None]
            if missed:  # changed by a transaction that committed after the statement began: claimed by id, if QUEUED
                try:
                    with self.engine.begin() as conn:
                        again = sorted(conn.execute(_CLAIM_LOCKED, {**values, "ids": missed}).scalars())
                        got = conn.execute(_CLAIMED_TASKS, {"ids": again}).all() if again else []
                    claims += again
                    tasks += [_task_from_tuple(row) for row in got]
                except Exception:  # what the statement claimed stands (committed): these stay QUEUED for a later pass
                    log.warning("Plexus: could not claim %d tasks of a group's head again", len(missed), exc_info=True)
        except BaseException:  # committed claims nobody would start: put back QUEUED (those still this claim's)
            if claims:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(_UNCLAIM_MINE, {"ids": sorted(set(claims)), "b_worker": values["b_worker"]})
                except Exception:
                    log.warning("Plexus: could not put back %d claims of a failed pass", len(claims), exc_info=True)
            raise
        tasks.sort(key=lambda task: (task.created_at, task.id))
        for task in tasks:  # as the queue showed it (the caller marks its claims: `TaskManager._mark_claimed`)
            task.status, task.worker, task.started_at, task.lease_expires_at = TaskStatus.QUEUED, None, None, None
        return tasks

    def _unwritten_elsewhere(self, writes: Sequence[ProgressWrite], written: set[str], holder: str) -> set[str]:
        """Of `writes` not `written` by a statement of their own, those another server holds (`_write_progress`'s
        `lost`; the others were final already). Read after that statement committed, again once when it fails; a
        second failure is raised (the caller's write of the ends is made again: what is written already is final,
        left alone), never taken as held elsewhere (a take-over: no final event)."""
        unwritten = [w.task.id for w in writes if w.task.id not in written]
        if not unwritten:
            return set()
        t = tasks_table
        elsewhere = sa.or_(t.c.worker.is_(None), sa.not_(_held_by(holder)))
        try:
            with self.reads.connect() as conn:
                return set(conn.execute(sa.select(t.c.id).where(t.c.id.in_(unwritten), elsewhere)).scalars())
        except Exception:
            log.warning("Plexus: could not read who holds %d tasks not written; reading again", len(unwritten))
        with self.reads.connect() as conn:  # a second failure is raised: the ends, made again, change nothing more
            return set(conn.execute(sa.select(t.c.id).where(t.c.id.in_(unwritten), elsewhere)).scalars())

    def _autocommit_rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """One statement on PostgreSQL's driver in autocommit (its own transaction): its rows."""
        with self.reads.connect() as conn:
            self.writes.saw(conn, sql)
            cursor = conn.connection.cursor()
            try:
                cursor.execute(sql, params)
                return [tuple(row) for row in cursor.fetchall()]
            except conn.dialect.loaded_dbapi.Error as exc:  # as `_OnDriver.run` raises it
                self.writes.bump()
                gone = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
                if gone:
                    conn.invalidate(exc)
                raise sa.exc.DBAPIError.instance(
                    sql, params, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=gone
                ) from exc
            finally:
                cursor.close()

    def _write_progress(self, conn: Connection, writes: Sequence[ProgressWrite], *, holder: str | None) -> set[str]:
        progress_rows: list[dict[str, Any]] = []
        final_rows: list[dict[str, Any]] = []
        for write in sorted(writes, key=lambda w: w.task.id):  # rows locked in one order (core/leases.py)
            task = write.task
            row: dict[str, Any] = {
                "b_id": task.id,
                "b_current_stage": task.current_stage,
                "b_estimated_completion_at": task.estimated_completion_at,
                "b_worker": task.worker,
            }
            if holder is not None:
                row["b_holder_like"] = _holder_pattern(holder)
            if write.final:
                row.update(
                    b_status=task.status.value,
                    b_completed_at=task.completed_at,
                    b_error_message=task.error_message,
                    b_error_details=task.error_details,
                    b_output=task.output,
                    b_stdout_tail=task.stdout_tail,
                    b_stderr_tail=task.stderr_tail,
                    b_trail=_trail(write.stages, write.samples),
                )
                final_rows.append(row)
            else:
                progress_rows.append(row)
        held = holder is not None
        updated = 0
        if progress_rows:
            updated += self._many(conn, _progress_update(final=False, held=held), progress_rows)
        if final_rows:
            updated += self._many(conn, _progress_update(final=True, held=held), final_rows)
        lost: set[str] = set()
        if holder is not None and updated < len(progress_rows) + len(final_rows):  # rare: which, in this transaction
            t = tasks_table
            elsewhere = sa.or_(t.c.worker.is_(None), sa.not_(_held_by(holder)))
            ids = [w.task.id for w in writes]
            lost = set(conn.execute(sa.select(t.c.id).where(t.c.id.in_(ids), elsewhere)).scalars())
        # A final write's stages and samples are in its row (tasks.trail); the others' in the child tables.
        tabled = [w for w in writes if not w.final and w.task.id not in lost]
        stage_rows = [_stage_row(w.task.id, stage) for w in tabled for stage in w.stages]
        sample_rows = [{"task_id": w.task.id, **_sample_row(sample)} for w in tabled for sample in w.samples]
        if stage_rows:
            self._upsert_stages(conn, stage_rows)
        if sample_rows:
            self._many(conn, _INSERT_SAMPLES, sample_rows)
        return lost

    def _prepared(self, statement: Any, row: Mapping[str, Any]) -> _OnDriver:
        """`statement` compiled for the driver. PostgreSQL: for the columns `row` names, as conn.execute does (an
        INSERT sends only those: a NULL id would not take its sequence's value); SQLite: for all of them (a NULL
        id takes the next one)."""
        assert self._on_driver is not None
        named = tuple(row) if not self._positional else None
        prepared = self._on_driver.get((statement, named))
        if prepared is None:
            prepared = self._on_driver[(statement, named)] = _OnDriver(statement, self.engine.dialect, named)
        return prepared

    def _many(self, conn: Connection, statement: Any, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run a prebuilt write for each of `rows` in `conn`'s transaction; the rows changed. On SQLite and
        PostgreSQL on the driver (`_OnDriver`, compiled once per statement); elsewhere through SQLAlchemy."""
        if self._on_driver is None:
            return int(conn.execute(statement, rows).rowcount)
        return self._on_the_driver(conn, statement, rows, many=True)[0]

    def _rows(self, conn: Connection, statement: Any, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run a prebuilt statement that returns rows (RETURNING) once in `conn`'s transaction: its rows. On the
        driver where `_many` runs there, else through SQLAlchemy."""
        if self._on_driver is None:
            return [tuple(row) for row in conn.execute(statement, params)]
        return self._on_the_driver(conn, statement, [params], many=False)[1]

    def _on_the_driver(
        self, conn: Connection, statement: Any, rows: Sequence[Mapping[str, Any]], *, many: bool
    ) -> tuple[int, list[tuple[Any, ...]]]:
        prepared = self._prepared(statement, rows[0] if rows else {})
        # What SQLAlchemy's events would have told the listing cache (core/listing_cache.py) about this write.
        self.writes.saw(conn, prepared.sql)
        try:
            return prepared.run(conn, rows, many=many)
        except sa.exc.DBAPIError:
            self.writes.bump()
            raise

    def history(self, task_id: str, *, limit: int) -> tuple[list[ProgressSample], int]:
        """The most recent `limit` progress samples of a task, oldest first, and how many exist."""
        s, t = samples_table, tasks_table
        with self.reads.connect() as conn:
            # The samples its final write carried (tasks.trail) come after the table's.
            last = _samples_from_trail(conn.execute(sa.select(t.c.trail).where(t.c.id == task_id)).scalar())
            total = conn.execute(sa.select(sa.func.count()).select_from(s).where(s.c.task_id == task_id)).scalar_one()
            rows = conn.execute(
                sa.select(s).where(s.c.task_id == task_id).order_by(s.c.id.desc()).limit(max(limit - len(last), 0))
            ).mappings()
            samples = [
                ProgressSample(
                    at=r["at"], stage=r["stage"], processed=r["processed"], total=r["total"], message=r["message"]
                )
                for r in rows
            ]
        samples.reverse()
        samples += last
        return samples[max(len(samples) - limit, 0) :] if limit > 0 else [], int(total) + len(last)

    # -- the queue (core/queue.py) -------------------------------------------------------------

    def queue_window(
        self, *, per_owner: int, limit: int, exact: bool = True
    ) -> tuple[list[Task], dict[tuple[int, str | None], int]]:
        """The first queued tasks of each owner at each priority (at most `per_owner` each, `limit` in all,
        shared evenly between the groups), by priority then age: enough to share the next starts between
        owners however long one owner's queue is. Also, for each (priority, owner) group with more queued
        tasks than were read, how many were not; with `exact=False` (the scheduler, which needs only to know
        whether a group has more), 1 for "at least one": the groups are then found by a seek each instead of
        counting every queued task (O(groups), not O(queued))."""
        rows: list[Any] = []
        cut: dict[tuple[int, str | None], int] = {}
        with self.reads.connect() as conn:
            groups: list[tuple[int, str | None, int | None]]
            if exact:
                groups = [(p, o, n) for p, o, n in conn.execute(_QUEUE_GROUPS, {"limit": limit})]
            else:
                groups = [(priority, owner, None) for priority, owner in self._queue_groups(conn, limit)]
            quota = min(per_owner, max(1, limit // max(len(groups), 1)))
            for priority, owner, queued in groups:
                if len(rows) >= limit:
                    cut[(priority, owner)] = 1 if queued is None else queued
                    continue
                take = min(quota, limit - len(rows))
                head = conn.execute(
                    _QUEUE_GROUP_HEAD[owner is not None],
                    {"priority": priority, "owner": owner, "per_owner": take + (queued is None)},
                ).all()
                if queued is None:  # one more than taken was asked for: it says whether the group has more
                    queued = len(head)
                    head = head[:take]
                rows += head
                if queued > take:
                    cut[(priority, owner)] = queued - take
        tasks = [_task_from_tuple(r) for r in rows]
        tasks.sort(key=lambda task: (-task.priority, task.created_at, task.id))
        return tasks, cut

    @staticmethod
    def _queue_groups(conn: Connection, limit: int) -> list[tuple[int, str | None]]:
        """The (priority, owner) groups with queued tasks, highest priority first (at most `limit`), found by
        seeks on the queue index: per priority, the owner-less group, then each owner in order."""
        groups: list[tuple[int, str | None]] = []
        priority = conn.execute(_QUEUE_PRIORITY[False]).scalar()
        while priority is not None and len(groups) < limit:
            if conn.execute(_QUEUE_UNOWNED, {"priority": priority}).first() is not None:
                groups.append((priority, None))
            owner = conn.execute(_QUEUE_NEXT_OWNER[False], {"priority": priority}).scalar()
            while owner is not None and len(groups) < limit:
                groups.append((priority, owner))
                owner = conn.execute(_QUEUE_NEXT_OWNER[True], {"priority": priority, "owner": owner}).scalar()
            priority = conn.execute(_QUEUE_PRIORITY[True], {"priority": priority}).scalar()
        return groups[:limit]

    def queued_ahead(self, task: Task) -> int:
        """How many queued tasks come before `task` by priority and age alone (sharing aside)."""
        t = tasks_table
        query = (
            sa.select(sa.func.count())
            .select_from(t)
            .where(
                _IS_QUEUED,
                sa.or_(
                    t.c.priority > task.priority,
                    sa.and_(
                        t.c.priority == task.priority,
                        sa.or_(
                            t.c.created_at < task.created_at,
                            sa.and_(t.c.created_at == task.created_at, t.c.id < task.id),
                        ),
                    ),
                ),
            )
        )
        with self.reads.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- retention (core/retention.py) ---------------------------------------------------------

    def prune_expired(self, policy: RetentionPolicy, at: float, batch: int) -> list[str]:
        """Remove up to `batch` finished tasks whose retention has passed (with their stages and history),
        leaving a tombstone for each, in one transaction; then as many tombstones past theirs.
        Returns the ids of the tasks removed."""
        t = tasks_table
        final = [s.value for s in FINAL_STATUSES]
        cols = (t.c.id, t.c.type, t.c.owner, t.c.completed_at, t.c.retention_seconds, t.c.params)
        finished = sa.and_(t.c.status.in_(final), t.c.completed_at.is_not(None))
        queries = [
            sa.select(*cols).where(
                finished, t.c.retention_seconds.is_(None), t.c.type == type_, t.c.completed_at < at - seconds
            )
            for type_, seconds in policy.by_type.items()
        ]
        queries.append(
            sa.select(*cols).where(
                finished,
                t.c.retention_seconds.is_(None),
                t.c.type.notin_(list(policy.by_type)),
                t.c.completed_at < at - policy.default_seconds,
            )
        )
        queries.append(
            sa.select(*cols).where(
                finished, t.c.retention_seconds.is_not(None), t.c.completed_at + t.c.retention_seconds < at
            )
        )
        rows: list[Any] = []
        with self.engine.begin() as conn:
            for query in queries:
                if len(rows) >= batch:
                    break
                rows += conn.execute(query.order_by(t.c.completed_at).limit(batch - len(rows))).all()
            ids = [r[0] for r in rows]
            if rows:
                conn.execute(
                    sa.insert(expired_table),
                    [
                        {
                            "id": task_id,
                            "type": type_,
                            "owner": owner,
                            "completed_at": completed,
                            "expired_at": at,
                            "retention_seconds": own if own is not None else policy.for_type(type_),
                            "evaluation_id": (params or {}).get("evaluation_id") if type_ == "evaluation" else None,
                        }
                        for task_id, type_, owner, completed, own, params in rows
                    ],
                )
                conn.execute(sa.delete(samples_table).where(samples_table.c.task_id.in_(ids)))
                conn.execute(sa.delete(stages_table).where(stages_table.c.task_id.in_(ids)))
                conn.execute(sa.delete(t).where(t.c.id.in_(ids)))
            x = expired_table
            old = sa.select(x.c.id).where(x.c.expired_at + x.c.retention_seconds < at).limit(batch)
            conn.execute(sa.delete(x).where(x.c.id.in_(old.scalar_subquery())))
        return ids

    def tombstone(self, task_id: str | None = None, *, evaluation_id: str | None = None) -> dict[str, Any] | None:
        """What is left of a task pruned by retention (id, type, owner, completed_at, expired_at, retention),
        found by the task's id or its evaluation's."""
        x = expired_table
        where = x.c.id == task_id if evaluation_id is None else x.c.evaluation_id == evaluation_id
        with self.reads.connect() as conn:
            row = conn.execute(sa.select(x).where(where)).mappings().first()
        return dict(row) if row is not None else None

    # -- helpers -------------------------------------------------------------------------------

    def _stages_for(self, conn: Connection, ids: list[str]) -> dict[str, list[Stage]]:
        if not ids:
            return {}
        if len(ids) <= _PREBUILT_IN_MAX:
            params = {f"id_{i}": task_id for i, task_id in enumerate(ids)}
            rows = conn.execute(_stages_query(len(ids)), params)
        else:
            st = stages_table
            query = sa.select(st).where(st.c.task_id.in_(ids)).order_by(st.c.task_id, st.c.stage_order)
            rows = conn.execute(query)
        out: dict[str, list[Stage]] = {}
        for r in rows:
            out.setdefault(r[0], []).append(_stage_from_tuple(r))
        return out

    def _upsert_stages(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert or update stage rows (keyed by task and order): one statement where the database has upserts."""
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            # A stage twice in one write: its last row (each upsert replaces all the row's values), as one VALUES
            # list may not upsert a row twice.
            latest = {(row["task_id"], row["stage_order"]): row for row in rows}
            self._many(conn, _upsert_stages_statement(dialect), list(latest.values()))
            return
        st = stages_table
        for row in rows:
            updated = conn.execute(
                sa.update(st)
                .where(st.c.task_id == row["task_id"], st.c.stage_order == row["stage_order"])
                .values(**{k: v for k, v in row.items() if k not in ("task_id", "stage_order")})
            )
            if updated.rowcount == 0:
                conn.execute(sa.insert(st).values(**row))


@dataclass
class Claim:
    """The claims of one scheduling pass (Store.claim_many, or with a batched write: Store.save_progress_many):
    the tasks to move from QUEUED to RUNNING for `worker` (a server id) at `started_at`; `won`, once written:
    those it moved (another server may have taken the others)."""

    task_ids: Sequence[str]
    worker: str
    started_at: float
    lease: float | None = None
    won: set[str] = field(default_factory=set)


@dataclass
class ProgressWrite:
    """What one batched write stores for one task (Store.save_progress_many)."""

    task: Task
    stages: list[Stage]
    samples: list[ProgressSample]
    final: bool = False


class PendingEnds:
    """PostgreSQL, `Store.save_progress_then`: a write of task ends (final writes only) not made yet, handed to the
    pass its ends call for as the transaction to claim in. A one-group claim of tasks of one type
    (`Store.claim_group_head(kind=)`) makes the write and the claim in one statement, in autocommit (`_ends_sql`);
    any other use opens a transaction and makes the write in it first (`transaction`); a pass that claims nothing
    leaves the write to be made alone, in one statement, once it returns."""

    def __init__(self, store: Store, writes: Sequence[ProgressWrite], holder: str, stack: contextlib.ExitStack) -> None:
        self.store, self.holder, self._stack = store, holder, stack
        self.writes = sorted(writes, key=lambda w: w.task.id)  # rows locked in one order (core/leases.py)
        self.lost: set[str] | None = None  # the tasks left unwritten (another server holds them), once written
        self.committed = False  # written by a statement of its own (not in `transaction`'s, undone with it)
        self._conn: Connection | None = None

    def transaction(self) -> Connection:
        """The transaction of the rest of the pass, the write made in it first unless made already."""
        if self._conn is None:
            self._conn = self._stack.enter_context(self.store.engine.begin())
            if self.lost is None:
                self.lost = self.store._write_progress(self._conn, self.writes, holder=self.holder)
        return self._conn

    def written(self, ids: Iterable[str]) -> None:
        """A statement of its own wrote the ends, `ids` those it changed (committed)."""
        self.committed = True
        self.lost = self.store._unwritten_elsewhere(self.writes, set(ids), self.holder)


def _held_by(holder: str | None = None) -> Any:
    """The tasks a server holds: their `worker` starts with its id (as Store.renew_leases reads it). Without
    `holder`, the server is the bound parameter b_holder_like of an executemany (`_holder_pattern`)."""
    t = tasks_table
    if holder is not None:
        return t.c.worker.startswith(holder, autoescape=True)
    return t.c.worker.like(sa.bindparam("b_holder_like"), escape="/")


def _holder_pattern(holder: str) -> str:
    """The LIKE pattern of the ids starting with `holder`, escaped as `startswith(autoescape=True)` does."""
    return holder.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


@functools.lru_cache(maxsize=4)
def _progress_update(*, final: bool, held: bool) -> Any:
    """The UPDATE of Store.save_progress_many; `held`: only of a task the writing server holds (b_holder_like)."""
    t = tasks_table
    columns = list(_PROGRESS_COLUMNS)
    query = sa.update(t).where(t.c.id == sa.bindparam("b_id"))
    if held:
        query = query.where(_held_by())
    if final:
        columns += _FINAL_COLUMNS
        # A task already final (cancelled meanwhile by another server, recovered) is never overwritten. Plain
        # comparisons, not NOT IN: an expanding IN parameter cannot be used in an executemany.
        query = query.where(*(t.c.status != s.value for s in FINAL_STATUSES))
    return query.values(**{name: sa.bindparam(f"b_{name}") for name in columns})


def _requeue(conn: Connection, task_id: str, *, holder: str | None) -> bool:
    """Store.requeue in an open transaction."""
    t = tasks_table
    query = sa.update(t).where(t.c.id == task_id)
    if holder is not None:
        query = query.where(_held_by(holder))
    done = (
        conn.execute(
            query.values(
                status=TaskStatus.QUEUED.value,
                started_at=None,
                completed_at=None,
                worker=None,
                lease_expires_at=None,
                current_stage=None,
                estimated_completion_at=None,
                error_message=None,
                error_details=None,
                trail=None,
            )
        ).rowcount
        == 1
    )
    if done:
        conn.execute(sa.delete(stages_table).where(stages_table.c.task_id == task_id))
        conn.execute(sa.delete(samples_table).where(samples_table.c.task_id == task_id))
    return done


# psycopg: up to this many rows, a write runs a statement per row instead of executemany, whose pipeline costs more
# for a few rows (a transaction updating 1 or 2 rows of a small table: client CPU 34-44 / 47-58 us against 59-81 /
# 70-82, PostgreSQL's backend 40 / 40 against 50 / 60; at 4 rows it is a toss-up, at 8 executemany wins).
FEW_ROWS = 2
# psycopg: an INSERT of a few rows is one statement with a VALUES list (one execution in PostgreSQL instead of one per
# row: executemany's pipeline saves the round trips, not those), when the statement stays one psycopg parses once
# and keeps (at most this many parameters, and 4,096 characters): a longer one is parsed again at every execution
# (a batch of 100 tasks' rows in one VALUES list cost 8 ms of client CPU a statement, executemany 3).
VALUES_PARAMS_MAX = 50
VALUES_SQL_MAX = 4096
_PYFORMAT_PARAM = re.compile(r"%\((\w+)\)s")


class _OnDriver:
    """A write run straight on the driver's cursor (SQLite's, psycopg's): the statements every small task runs
    (its insert, its claim, its progress and final writes, its stages and samples). SQLAlchemy's own work per
    execution (an execution context, parameters processed row by row: about 60 us) cost more than SQLite's for
    the few rows of a small task, and on PostgreSQL most of the store writer thread's CPU per task. Compiled
    once (on PostgreSQL for the columns the rows name: `columns`); each parameter passes through its type's
    bind processor (JSON as SQLAlchemy serialises it), so the rows stored are the ones `conn.execute` would
    store. The statement runs in the connection's open transaction (SQLAlchemy's, committed by it)."""

    def __init__(self, statement: Any, dialect: sa.Dialect, columns: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
        self.sql = str(compiled)
        self.positional = bool(compiled.positional)
        keys = list(compiled.positiontup or ()) if self.positional else list(compiled.params)
        self._keys = keys
        # Every parameter's value when a row does not name it: a constant of the statement (e.g. the statuses it
        # compares with), else None (as conn.execute binds a missing one).
        self._defaults = {key: compiled.params.get(key) for key in keys}
        getter = operator.itemgetter(*keys) if keys else (lambda _row: ())
        self._values: Callable[[Mapping[str, Any]], Sequence[Any]] = (
            (lambda row: (getter(row),)) if len(keys) == 1 else getter
        )
        processor = (
            (lambda key: compiled.binds[key].type.bind_processor(dialect))
            if self.positional
            else compiled._bind_processors.get  # the dialect's own (psycopg's JSON), as conn.execute uses
        )
        self._convert = [(i, convert) for i, key in enumerate(keys) if (convert := processor(key)) is not None]
        # psycopg: an INSERT takes several rows in one VALUES list (`_values_sql`), without the RETURNING SQLAlchemy
        # adds for a serial id (a run of many rows returns none).
        self._insert = self.sql.split(" RETURNING ")[0] if self.sql.startswith("INSERT") else ""
        self._values_list = None if self.positional or not self._insert else _values_group(self._insert)
        self._values_sqls: dict[int, str] = {}

    def _params(self, row: Mapping[str, Any]) -> Any:
        """A row's parameters as the driver takes them: in the statement's order (SQLite) or by name (psycopg)."""
        row_values = self._values({**self._defaults, **row})
        if self._convert:
            row_values = list(row_values)
            for i, fn in self._convert:
                row_values[i] = fn(row_values[i])
        return row_values if self.positional else dict(zip(self._keys, row_values, strict=True))

    def run(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]], *, many: bool
    ) -> tuple[int, list[tuple[Any, ...]]]:
        """Run it for every row (a mapping of its parameters), or (not `many`) once for the first: the rows it
        changed, and the rows it returned (not asked after an executemany)."""
        params: Any = [self._params(row) for row in rows] if many else self._params(rows[0])
        cursor = conn.connection.cursor()
        try:
            values_sql = self._values_sql(len(params)) if many and len(params) > 1 else None
            if values_sql is not None:
                cursor.execute(
                    values_sql, {f"{key}__{i}": value for i, row in enumerate(params) for key, value in row.items()}
                )
                return int(cursor.rowcount), []
            if many and (self.positional or len(params) > FEW_ROWS):
                cursor.executemany(self.sql, params)
                return int(cursor.rowcount), []
            if many:  # psycopg: a few rows cost less one by one than in the pipeline executemany opens
                changed = 0
                for row_params in params:
                    cursor.execute(self.sql, row_params)
                    changed += cursor.rowcount
                return changed, []
            cursor.execute(self.sql, params)
            return int(cursor.rowcount), [tuple(r) for r in cursor.fetchall()]
        except conn.dialect.loaded_dbapi.Error as exc:  # raised as SQLAlchemy raises it: callers handle those
            # A connection the database dropped (a restart) is discarded, as SQLAlchemy does: the pool reconnects.
            gone = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
            if gone:
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                self.sql, params, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=gone
            ) from exc
        finally:
            cursor.close()

    def _values_sql(self, n: int) -> str | None:
        """The INSERT with `n` rows in its VALUES list, each row's parameters suffixed with its place (`__i`); None
        when it is no INSERT psycopg takes so (SQLite's, or beyond VALUES_PARAMS_MAX or VALUES_SQL_MAX)."""
        if self._values_list is None or n * len(self._keys) > VALUES_PARAMS_MAX:
            return None
        sql = self._values_sqls.get(n)
        if sql is None:
            start, end = self._values_list
            group = self._insert[start:end]
            rows = ", ".join(_PYFORMAT_PARAM.sub(rf"%(\1__{i})s", group) for i in range(n))
            sql = self._insert[:start] + rows + self._insert[end:]
            sql = self._values_sqls[n] = sql if len(sql) <= VALUES_SQL_MAX else ""
        return sql or None


def _values_group(sql: str) -> tuple[int, int] | None:
    """Where an INSERT's one VALUES row, `(...)`, begins and ends in its SQL (None if it has no such row)."""
    start = sql.find(" VALUES (")
    if start < 0:
        return None
    start += len(" VALUES ")
    depth = 0
    for end in range(start, len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[end], 0)
        if depth == 0:
            return start, end + 1
    return None


@functools.lru_cache(maxsize=2)
def _upsert_stages_statement(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    statement: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(stages_table)
    keys = ("task_id", "stage_order")
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={c.name: statement.excluded[c.name] for c in stages_table.columns if c.name not in keys},
    )


# Listing statements, built once per shape (how many statuses and types, which optional filters) with
# bind parameters for every value: building and cache-keying a statement per call, and expanding an
# IN list of ids at each execution, cost more than running the queries on SQLite.
_PREBUILT_IN_MAX = 128
_IN_CHUNK = 500  # ids per IN (...) list: SQLite allows at most 32,766 bound values, older builds 999


@functools.lru_cache(maxsize=256)
def _list_query(
    n_statuses: int,
    n_types: int,
    since: bool,
    owner: bool,
    after: bool,
    viewer: bool = False,
    batch: bool = False,
    before: bool = False,
) -> sa.Select[Any]:
    if n_statuses <= 1:
        return _list_one(tuple(range(n_statuses)), n_types, since, owner, after, viewer, batch, before)
    # Several statuses: one ordered, limited read per status (each walks ix_tasks_status_created from its
    # newest end), merged. A single `status IN (...)` read sorted every matching row: 53 ms at 100,000.
    parts = [
        _list_one((i,), n_types, since, owner, after, viewer, batch, before).subquery(f"by_status_{i}")
        for i in range(n_statuses)
    ]
    merged = sa.union_all(*(sa.select(part) for part in parts)).subquery("merged")
    return sa.select(merged).order_by(merged.c.created_at.desc(), merged.c.id.desc()).limit(sa.bindparam("limit"))


def _list_one(
    statuses: tuple[int, ...],
    n_types: int,
    since: bool,
    owner: bool,
    after: bool,
    viewer: bool,
    batch: bool,
    before: bool,
) -> sa.Select[Any]:
    t = tasks_table
    query = sa.select(t).order_by(t.c.created_at.desc(), t.c.id.desc()).limit(sa.bindparam("limit"))
    if statuses:
        query = query.where(t.c.status.in_([sa.bindparam(f"status_{i}") for i in statuses]))
    if n_types:
        query = query.where(t.c.type.in_([sa.bindparam(f"type_{i}") for i in range(n_types)]))
    if since:
        query = query.where(t.c.created_at >= sa.bindparam("since"))
    if owner:
        query = query.where(t.c.owner == sa.bindparam("owner"))
    if viewer:
        query = query.where(visible_to(t.c.owner, sa.bindparam("viewer")))
    if batch:
        query = query.where(t.c.batch_id == sa.bindparam("batch_id"))
    if before:
        query = query.where(t.c.created_at < sa.bindparam("before"))
    if after:
        created: Any = sa.bindparam("after_created")
        task_id: Any = sa.bindparam("after_id")
        query = query.where(sa.or_(t.c.created_at < created, sa.and_(t.c.created_at == created, t.c.id < task_id)))
    return query


# The queue's shares (Store.queue_window): its (priority, owner) groups come from the ix_tasks_owner_queue
# index alone, then each group's first tasks by an index seek; a window function ranking every queued row
# measured 15 ms with 4,000 queued, this 1 ms.
_t = tasks_table
_QUEUE_GROUPS = (
    sa.select(_t.c.priority, _t.c.owner, sa.func.count())
    .where(_IS_QUEUED)
    .group_by(_t.c.priority, _t.c.owner)
    .order_by(_t.c.priority.desc())
    .limit(sa.bindparam("limit"))
)
# The same groups found by seeks instead (Store.queue_window(exact=False), the scheduler's read): the GROUP BY reads
# every queued index entry to count them, 34 ms on the loop with 100,000 queued; a seek per group does not count.
_bp = sa.bindparam
_QUEUE_PRIORITY = {  # the highest priority with queued tasks (below `priority`)
    below: sa.select(_t.c.priority)
    .where(_IS_QUEUED, *((_t.c.priority < _bp("priority"),) if below else ()))
    .order_by(_t.c.priority.desc())
    .limit(1)
    for below in (False, True)
}
_QUEUE_UNOWNED = sa.select(_t.c.id).where(_IS_QUEUED, _t.c.priority == _bp("priority"), _t.c.owner.is_(None)).limit(1)
_QUEUE_NEXT_OWNER = {  # the first owner (after `owner`) with queued tasks at `priority`
    after: sa.select(_t.c.owner)
    .where(
        _IS_QUEUED,
        _t.c.priority == _bp("priority"),
        _t.c.owner > _bp("owner") if after else _t.c.owner.is_not(None),
    )
    .order_by(_t.c.owner)
    .limit(1)
    for after in (False, True)
}
_QUEUE_GROUP_HEAD = {
    owned: sa.select(_t)
    .where(_queued_in_group(owned, "priority", "owner"))
    .order_by(_t.c.created_at, _t.c.id)
    .limit(sa.bindparam("per_owner"))
    for owned in (True, False)
}


@functools.lru_cache(maxsize=_PREBUILT_IN_MAX)
def _stages_query(n_ids: int) -> sa.Select[Any]:
    st = stages_table
    return (
        sa.select(st)
        .where(st.c.task_id.in_([sa.bindparam(f"id_{i}") for i in range(n_ids)]))
        .order_by(st.c.task_id, st.c.stage_order)
    )


def _filter_clauses(flt: TaskFilter) -> list[Any]:
    t = tasks_table
    clauses: list[Any] = []
    if flt.statuses:
        clauses.append(t.c.status.in_([s.value for s in flt.statuses]))
    if flt.types:
        clauses.append(t.c.type.in_(list(flt.types)))
    if flt.since is not None:
        clauses.append(t.c.created_at >= flt.since)
    if flt.owner is not None:
        clauses.append(t.c.owner == flt.owner)
    if flt.viewer is not None:
        clauses.append(visible_to(t.c.owner, flt.viewer))
    if flt.batch_id is not None:
        clauses.append(t.c.batch_id == flt.batch_id)
    if flt.before is not None:
        clauses.append(t.c.created_at < flt.before)
    return clauses


SQLITE_BUSY_MS = 5000  # how long a SQLite connection waits for another's lock before "database is locked"


def _into_wal(cursor: Any) -> None:
    """Put the database in WAL mode (kept in the file: a no-op once one connection has). On a new file the change
    takes an exclusive lock and does not wait for another connection's (the busy timeout does not apply): servers
    or connections opening a new store at once got "database is locked" (112 of 600 in a probe of three processes
    at a barrier). It is tried again every 10 ms, for as long as the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    # WAL lets readers (REST, MCP resources) proceed while a progress write commits; NORMAL
    # sync is durable across process crashes, which is the failure this store must survive.
    _into_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The WAL is copied back into the database by the store's checkpointer thread (_Checkpointer): left to
    # SQLite, the commit that fills the WAL to its 1,000 pages does it, with an fsync, on whatever thread
    # committed, most often the event loop's (measured: 1% of the commits held 45% of their time, up to 50 ms).
    # This bound only matters if that thread falls behind.
    cursor.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_FALLBACK_PAGES}")
    cursor.close()


class _Checkpointer:
    """Copies a SQLite store's WAL back into its database file every `interval` seconds (a PASSIVE checkpoint:
    it never waits for, nor blocks, readers and writers), on a thread of its own, so the fsync it costs is
    never on the event loop (see _sqlite_pragmas). It borrows one of the engine's connections each time (the
    same file, URI and options as every other)."""

    def __init__(self, engine: Engine, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._engine = engine
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plexus-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                conn = self._engine.raw_connection()
                try:
                    conn.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    conn.close()  # back to the pool
            except Exception as exc:  # e.g. the file went away in a test's cleanup: try again later
                log.debug("Plexus: a WAL checkpoint failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _task_row(task: Task) -> dict[str, Any]:
    row = {name: getattr(task, name) for name in _TASK_FIELDS}
    row["status"] = task.status.value
    row["trail"] = None
    return row


def _task_from_row(row: Any) -> Task:
    return _task_from_dict({name: row[name] for name in _TASK_COLUMNS})


def _task_from_tuple(row: Any) -> Task:
    """A plain row of `select(tasks_table)` (table-column order): cheaper than by-name access."""
    return _task_from_dict(dict(zip(_TASK_COLUMNS, row, strict=True)))


def _task_from_dict(data: dict[str, Any]) -> Task:
    """A task from its row's values; the stages its final write carried (`trail`) are its stages until
    `_merged_stages` merges the child table's rows in (`task.stages = _merged_stages(task.stages, rows)`)."""
    trail = data.pop("trail")
    data["status"] = TaskStatus(data["status"])
    data["params"] = data["params"] or {}
    data["cancel_requested"] = bool(data["cancel_requested"])
    task = Task(**data)
    if trail:
        task.stages = _stages_from_trail(task.id, trail)
    return task


def _stages_from_trail(task_id: str, trail: Mapping[str, Any] | None) -> list[Stage]:
    """The stages a final write carried (tasks.trail; SQL NULL when it carried none, or the JSON null a store
    written before held: None here too): each item is a task_stages row without its task id."""
    return [_stage_from_tuple((task_id, *item)) for item in (trail or {}).get("stages", ())]


def _merged_stages(carried: list[Stage], rows: list[Stage]) -> list[Stage]:
    """The child table's `rows`, each replaced by the stage of its order a final write `carried`, in order."""
    if not carried:
        return rows
    if not rows:
        return carried
    by_order = {stage.order: stage for stage in rows}
    by_order.update((stage.order, stage) for stage in carried)
    return [by_order[order] for order in sorted(by_order)]


def _trail(stages: Sequence[Stage], samples: Sequence[ProgressSample]) -> dict[str, Any] | None:
    """What a final write's row carries of its stages and samples (tasks.trail), or None if it has neither."""
    if not stages and not samples:
        return None
    return {
        "stages": [_stage_values(stage) for stage in stages],
        "samples": [[x.at, x.stage, x.processed, x.total, x.message] for x in samples],
    }


def _samples_from_trail(trail: Mapping[str, Any] | None) -> list[ProgressSample]:
    return [ProgressSample(*item) for item in (trail or {}).get("samples", ())]


_STAGE_COLUMNS = (
    "task_id",
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
assert tuple(c.name for c in stages_table.columns) == _STAGE_COLUMNS


def _stage_from_tuple(r: Any) -> Stage:
    """A plain row of task_stages (in _STAGE_COLUMNS order) to a Stage: cheaper than by-name access."""
    (_task_id, order, name, status, status_message, total_items, processed_items, started_at, completed_at, eta) = r
    return Stage(
        name=name,
        order=order,
        status=StageStatus(status),
        status_message=status_message,
        total_items=total_items,
        processed_items=processed_items,
        started_at=started_at,
        completed_at=completed_at,
        estimated_completion_at=eta,
    )


def _stage_values(stage: Stage) -> list[Any]:
    """A stage's values in _STAGE_COLUMNS order but the task id (a task_stages row; an item of a trail)."""
    return [
        stage.order,
        stage.name,
        stage.status.value,
        stage.status_message,
        stage.total_items,
        stage.processed_items,
        stage.started_at,
        stage.completed_at,
        stage.estimated_completion_at,
    ]


def _stage_row(task_id: str, stage: Stage) -> dict[str, Any]:
    return dict(zip(_STAGE_COLUMNS, (task_id, *_stage_values(stage)), strict=True))


def _sample_row(sample: ProgressSample) -> dict[str, Any]:
    return {
        "at": sample.at,
        "stage": sample.stage,
        "processed": sample.processed,
        "total": sample.total,
        "message": sample.message,
    }


def values_with_prefix(
    engine: sa.Engine, column: Any, owner_column: Any, created_column: Any, prefix: str, viewer: str | None, limit: int
) -> list[str]:
    """Distinct values of `column` (an id) starting with `prefix`, newest first, at most `limit`, of the rows a
    caller with owner `viewer` (None: an admin) may see: what completion offers for an id argument."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    query = (
        sa.select(column, sa.func.max(created_column).label("newest"))
        .where(column.is_not(None))
        .where(column.like(escaped + "%", escape="\\"))
        .group_by(column)
        .order_by(sa.desc("newest"), column)
        .limit(limit)
    )
    if viewer is not None:
        query = query.where(visible_to(owner_column, viewer))
    with engine.connect() as conn:
        return [str(row[0]) for row in conn.execute(query)]
