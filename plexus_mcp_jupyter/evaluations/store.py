"""Evaluations and their per-item results, in the same database as the tasks.

An evaluation is a task of type `evaluation` plus this record. Its status, progress and times are the
task's (one source of truth); the record holds what only an evaluation has: its definition, its
metrics and a manifest of its items. Items are written by the worker as Parquet files beside the store
(item_files.py), a file per scored chunk; an evaluation made before those files (its manifest is null) keeps
its items as rows of evaluation_items, which stay readable, paged and pruned as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..core.errors import InvalidArgument
from ..core.models import TaskStatus
from ..core.ownership import visible_to
from ..core.store import (
    decode_position,
    encode_position,
    metadata,
    postgres_lock_wait,
    sqlite_lock_wait,
    tasks_table,
)
from .item_files import ItemFiles
from .metrics import LabelNormalization

SETUP_STAGE = "Setup"

evaluations_table = sa.Table(
    "evaluations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, unique=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("metrics", sa.JSON),  # {score name: metrics}, set once when the evaluation completes
    sa.Column("counts", sa.JSON),  # items, scored, errors (per score), set with the metrics
    sa.Column("items_pruned_at", sa.Float),  # set when the items of a cancelled evaluation have been deleted
    # Where the items are (item_files.py: format, path; chunks and rows per score once complete); null: rows.
    sa.Column("items_manifest", sa.JSON),
    sa.Index("ix_evaluations_created", "created_at", "id"),
    sa.Index("ix_evaluations_type_created", "type", "created_at", "id"),
)

items_table = sa.Table(
    "evaluation_items",
    metadata,
    sa.Column("evaluation_id", sa.String(36), sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("score", sa.String(128), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),  # the item's position in the (sampled) dataset
    sa.Column("item_id", sa.Text),
    sa.Column("input", sa.Text),  # an excerpt
    sa.Column("label", sa.Text),
    sa.Column("label_class", sa.Text),  # the label normalised as the metrics see it (the label= filter)
    sa.Column("prediction", sa.Text),
    sa.Column("correct", sa.Boolean),  # null when the item could not be scored
    sa.Column("explanation", sa.Text),
    sa.Column("error", sa.Text),
    sa.Index("ix_items_label", "evaluation_id", "score", "label_class", "seq"),
)

# only_mismatches reads the wrong and unscored items: a partial index holds only those (most items are right),
# which costs a fraction of a full index on every insert. The query's condition is the index's, word for word,
# so that the database can use it.
MISMATCH = items_table.c.correct.is_not(True)
sa.Index(
    "ix_items_mismatches",
    items_table.c.evaluation_id,
    items_table.c.score,
    items_table.c.seq,
    sqlite_where=MISMATCH,
    postgresql_where=MISMATCH,
)

ITEM_COLUMNS = ("seq", "item_id", "input", "label", "prediction", "correct", "explanation", "error")
# The order of the rows the runner writes (after evaluation_id and score).
INSERT_COLUMNS = ("seq", "item_id", "input", "label", "label_class", "prediction", "correct", "explanation", "error")
INSERT_BATCH = 5000  # rows per transaction: the SQLite write lock is released between batches
# The items as Arrow (REST's Arrow IPC stream, exports): ids as text, as pages show them.
ITEM_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("item_id", pa.string()),
        ("input", pa.string()),
        ("label", pa.string()),
        ("prediction", pa.string()),
        ("correct", pa.bool_()),
        ("explanation", pa.string()),
        ("error", pa.string()),
    ]
)


class EvaluationStatus:
    """An evaluation's status, derived from its task's: SETUP -> RUNNING -> COMPLETED | FAILED | CANCELLED."""

    SETUP = "SETUP"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ALL = (SETUP, RUNNING, COMPLETED, FAILED, CANCELLED)

    @staticmethod
    def of(task_status: TaskStatus, current_stage: str | None) -> str:
        if task_status is TaskStatus.QUEUED or (
            task_status is TaskStatus.RUNNING and current_stage in (None, SETUP_STAGE)
        ):
            return EvaluationStatus.SETUP
        return task_status.value

    @staticmethod
    def clause(status: str) -> Any:
        """The SQL condition on the task row for one evaluation status."""
        t = tasks_table
        in_setup = sa.or_(t.c.current_stage.is_(None), t.c.current_stage == SETUP_STAGE)
        if status == EvaluationStatus.SETUP:
            return sa.or_(
                t.c.status == TaskStatus.QUEUED.value,
                sa.and_(t.c.status == TaskStatus.RUNNING.value, in_setup),
            )
        if status == EvaluationStatus.RUNNING:
            return sa.and_(t.c.status == TaskStatus.RUNNING.value, sa.not_(in_setup))
        return t.c.status == status


def parse_statuses(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for part in (p.strip().upper() for p in parts):
        if not part:
            continue
        if part not in EvaluationStatus.ALL:
            raise InvalidArgument(
                f"unknown evaluation status {part!r}; expected one of {', '.join(EvaluationStatus.ALL)}"
            )
        out.append(part)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class EvaluationFilter:
    statuses: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    owner: str | None = None
    viewer: str | None = None  # as TaskFilter.viewer

    def fingerprint(self) -> str:
        raw = json.dumps(["evaluations", sorted(self.statuses), sorted(self.types), self.owner, self.viewer]).encode()
        return hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class ItemFilter:
    score: str
    only_mismatches: bool = False
    label: str | None = None

    def fingerprint(self) -> str:
        raw = json.dumps(["items", self.score, self.only_mismatches, self.label]).encode()
        return hashlib.sha256(raw).hexdigest()[:12]


class EvaluationStore:
    """Reads and writes evaluation records and items on an engine shared with the task Store."""

    def __init__(self, engine: Engine, files: ItemFiles | None = None) -> None:
        self.engine = engine  # its tables are made by the store's migrations (migrations/), as every table
        self.files = files  # where new evaluations' items go; None: as rows (a store used without a data dir)

    def create(self, row: dict[str, Any], conn: Connection | None = None) -> None:
        """Insert an evaluation's record, in `conn`'s transaction when given (the one storing its task)."""
        if conn is not None:
            conn.execute(sa.insert(evaluations_table).values(**row))
            return
        with self.engine.begin() as own:
            own.execute(sa.insert(evaluations_table).values(**row))

    def get(self, evaluation_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(_SELECT_ONE, {"id": evaluation_id}).mappings().first()
        return dict(row) if row is not None else None

    def by_task(self, task_id: str) -> dict[str, Any] | None:
        e = evaluations_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(e).where(e.c.task_id == task_id)).mappings().first()
        return dict(row) if row is not None else None

    def list_records(
        self, flt: EvaluationFilter, *, limit: int, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of evaluation records, newest first, and the cursor of the next page."""
        e, t = evaluations_table, tasks_table
        query = (
            sa.select(e).join(t, t.c.id == e.c.task_id).order_by(e.c.created_at.desc(), e.c.id.desc()).limit(limit + 1)
        )
        if flt.statuses:
            query = query.where(sa.or_(*(EvaluationStatus.clause(s) for s in flt.statuses)))
        if flt.types:
            query = query.where(e.c.type.in_(flt.types))
        if flt.owner is not None:
            query = query.where(e.c.owner == flt.owner)
        if flt.viewer is not None:
            query = query.where(visible_to(e.c.owner, flt.viewer))
        if cursor:
            created, evaluation_id = decode_position(cursor, flt.fingerprint(), 2)
            if not isinstance(created, int | float) or not isinstance(evaluation_id, str):
                raise InvalidArgument("invalid cursor: pass back the next_cursor of a previous page unchanged")
            query = query.where(
                sa.or_(e.c.created_at < created, sa.and_(e.c.created_at == created, e.c.id < evaluation_id))
            )
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_position([rows[-1]["created_at"], rows[-1]["id"]], flt.fingerprint())
        return rows, next_cursor

    # -- items (written by the worker) --------------------------------------------------------------

    def add_items(self, evaluation_id: str, score: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert items (tuples in INSERT_COLUMNS order), a batch per transaction, every row whole.

        Through the driver's executemany: SQLAlchemy's per-row parameter processing cost several times
        the insert itself at a million rows.
        """
        columns = ("evaluation_id", "score", *INSERT_COLUMNS)
        sql = f"INSERT INTO {items_table.name} ({', '.join(columns)}) VALUES ({_placeholders(self.engine, columns)})"
        for start in range(0, len(rows), INSERT_BATCH):
            batch = [(evaluation_id, score, *row) for row in rows[start : start + INSERT_BATCH]]
            with self.engine.begin() as conn:
                conn.exec_driver_sql(sql, batch)

    def add_chunk(self, evaluation_id: str, score: str, start: int, columns: dict[str, Any]) -> None:
        """Record one scored chunk's items (columns of INSERT_COLUMNS, seq from `start` on): a Parquet file
        when the store has an items directory, rows otherwise."""
        if self.files is not None:
            self.files.write_chunk(evaluation_id, score, start, columns)
            return
        self.add_items(evaluation_id, score, item_rows(columns))

    def reset(self, evaluation_id: str) -> None:
        """Forget the items, metrics and counts of an earlier run (rows in one transaction, files before it),
        and record where this run's items go."""
        manifest = None
        if self.files is not None:
            self.files.start(evaluation_id)
            manifest = self.files.manifest(evaluation_id)
        with self.engine.begin() as conn:
            conn.execute(sa.delete(items_table).where(items_table.c.evaluation_id == evaluation_id))
            conn.execute(
                sa.update(evaluations_table)
                .where(evaluations_table.c.id == evaluation_id)
                .values(metrics=None, counts=None, items_pruned_at=None, items_manifest=manifest)
            )

    def remove_files(self, evaluation_id: str) -> bool:
        """Delete an evaluation's item files, if it has any here; True if some went."""
        return self.files.remove(evaluation_id) if self.files is not None else False

    def sweep_files(self) -> list[str]:
        """Delete the item files of evaluations whose record is gone (retention, a deleted task); their ids.

        A directory is made only by a worker that found the evaluation's record, so no record means no owner."""
        if self.files is None:
            return []
        present = self.files.evaluation_ids()
        gone = []
        e = evaluations_table
        for start in range(0, len(present), 500):
            batch = present[start : start + 500]
            with self.engine.connect() as conn:
                known = set(conn.execute(sa.select(e.c.id).where(e.c.id.in_(batch))).scalars())
            gone += [evaluation_id for evaluation_id in batch if evaluation_id not in known]
        for evaluation_id in gone:
            self.files.remove(evaluation_id)
        return gone

    def unpruned_cancelled(self) -> list[str]:
        """Ids of cancelled evaluations whose items have not been pruned yet, oldest first."""
        e, t = evaluations_table, tasks_table
        query = (
            sa.select(e.c.id)
            .join(t, t.c.id == e.c.task_id)
            .where(t.c.status == TaskStatus.CANCELLED.value, e.c.items_pruned_at.is_(None))
            .order_by(e.c.created_at)
        )
        with self.engine.connect() as conn:
            return [str(r) for r in conn.execute(query).scalars()]

    def delete_items(self, evaluation_id: str, batch: int, *, lock_wait: float | None = None) -> int:
        """Delete at most `batch` items of an evaluation in one transaction; returns how many went. With
        `lock_wait`, a lock held elsewhere fails it after that long (`_writing`).

        From its first remaining item on, by key range (items of a score are numbered 0, 1, 2...), so
        each batch is found through the primary key, on SQLite and PostgreSQL alike.
        """
        i = items_table
        with self._writing(lock_wait) as conn:
            first = conn.execute(
                sa.select(i.c.score, i.c.seq)
                .where(i.c.evaluation_id == evaluation_id)
                .order_by(i.c.score, i.c.seq)
                .limit(1)
            ).first()
            if first is None:
                return 0
            gone = conn.execute(
                sa.delete(i).where(
                    i.c.evaluation_id == evaluation_id,
                    i.c.score == first.score,
                    i.c.seq >= first.seq,
                    i.c.seq < first.seq + batch,
                )
            )
            return int(gone.rowcount)

    def mark_pruned(self, evaluation_id: str, at: float, *, lock_wait: float | None = None) -> None:
        e = evaluations_table
        with self._writing(lock_wait) as conn:
            conn.execute(sa.update(e).where(e.c.id == evaluation_id).values(items_pruned_at=at))

    @contextlib.contextmanager
    def _writing(self, lock_wait: float | None) -> Iterator[Connection]:
        """A write transaction; with `lock_wait` (seconds) a lock held elsewhere (SQLite: another connection's write
        transaction; PostgreSQL: a row or table lock) fails it after that long, rolled back (`lock_timed_out`), not
        after the store's own timeouts (SQLite's busy timeout, 5 s; PostgreSQL's statement timeout, 30 s)."""
        with self.engine.connect() as conn, sqlite_lock_wait(conn, lock_wait), conn.begin():
            postgres_lock_wait(conn, lock_wait)
            yield conn

    def set_results(self, evaluation_id: str, metrics: dict[str, Any], counts: dict[str, Any]) -> None:
        """Record the metrics and counts, and (items in files) the manifest's chunks and rows per score."""
        e = evaluations_table
        values: dict[str, Any] = {"metrics": metrics, "counts": counts}
        if self.files is not None:
            values["items_manifest"] = self.files.manifest(
                evaluation_id, {name: self.files.count(evaluation_id, name) for name in counts}
            )
        with self.engine.begin() as conn:
            conn.execute(sa.update(e).where(e.c.id == evaluation_id).values(**values))

    def items(
        self,
        evaluation_id: str,
        flt: ItemFilter,
        *,
        limit: int,
        cursor: str | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of items in dataset order, and the cursor of the next page.

        `manifest` is the record's items_manifest: the items are read from its files, or (null) from rows."""
        label = LabelNormalization().normalize(flt.label) if flt.label is not None else None
        after = None
        if cursor:
            (after,) = decode_position(cursor, flt.fingerprint(), 1)
            if not isinstance(after, int):
                raise InvalidArgument("invalid cursor: pass back the next_cursor of a previous page unchanged")
        if manifest is not None:
            rows = ItemFiles(Path(manifest["path"]).parent).page(
                evaluation_id,
                flt.score,
                limit=limit + 1,
                after=after,
                only_mismatches=flt.only_mismatches,
                label=label,
                columns=ITEM_COLUMNS,
            )
        else:
            params: dict[str, Any] = {"evaluation_id": evaluation_id, "score": flt.score, "limit": limit + 1}
            params.update({k: v for k, v in (("label", label), ("after", after)) if v is not None})
            query = _items_query(flt.only_mismatches, label is not None, after is not None)
            with self.engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(query, params).mappings()]
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_position([rows[-1]["seq"]], flt.fingerprint())
        return rows, next_cursor

    def item_tables(
        self, evaluation_id: str, flt: ItemFilter, manifest: dict[str, Any] | None = None
    ) -> Iterator[pa.Table]:
        """Every item matching `flt`, in dataset order, as Arrow tables of ITEM_SCHEMA, a row group (or a page of
        rows) at a time: the items of an evaluation of any size, in bounded memory."""
        label = LabelNormalization().normalize(flt.label) if flt.label is not None else None
        if manifest is not None:
            for table in ItemFiles(Path(manifest["path"]).parent).tables(
                evaluation_id, flt.score, None, flt.only_mismatches, label, ITEM_COLUMNS
            ):
                yield table.cast(ITEM_SCHEMA)
            return
        cursor = None
        while True:
            rows, cursor = self.items(evaluation_id, flt, limit=INSERT_BATCH, cursor=cursor)
            if rows:
                yield pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
            if cursor is None:
                return

    def count_items(self, evaluation_id: str, score: str) -> int:
        """Items recorded so far, rows and files alike.

        Only tests call it, and it stays for them: it is the one count that spans both places an item can be
        (item rows of older stores and Parquet chunk files), so tests of cancellation, deletion and retention
        (test_hardening_evaluations, test_columnar_items, test_store_dialects) assert "nothing left" or "this
        many written" against the store itself rather than through a view that could hide a leftover. The
        faces show the task's progress (processed_items) instead, which costs no scan."""
        i = items_table
        query = sa.select(sa.func.count()).where(i.c.evaluation_id == evaluation_id, i.c.score == score)
        with self.engine.connect() as conn:
            rows = int(conn.execute(query).scalar_one())
        return rows + (self.files.count(evaluation_id, score) if self.files is not None else 0)


def item_rows(columns: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A chunk's item columns (runner._columns) as rows in INSERT_COLUMNS order; ids as text, as rows hold them."""
    lists = {name: values.to_pylist() if isinstance(values, pa.Array) else values for name, values in columns.items()}
    if isinstance(columns["item_id"], pa.Array):
        lists["item_id"] = [None if i is None else str(i) for i in lists["item_id"]]
    return list(zip(*(lists[c] for c in INSERT_COLUMNS), strict=True))


def _placeholders(engine: Engine, columns: Sequence[str]) -> str:
    style = engine.dialect.paramstyle
    if style == "qmark":
        return ", ".join("?" for _ in columns)
    if style in ("format", "pyformat"):
        return ", ".join("%s" for _ in columns)
    if style == "numeric":
        return ", ".join(f":{i + 1}" for i in range(len(columns)))
    raise RuntimeError(f"unsupported DB-API parameter style {style!r}")


_SELECT_ONE = sa.select(evaluations_table).where(evaluations_table.c.id == sa.bindparam("id"))


@functools.lru_cache(maxsize=8)
def _items_query(only_mismatches: bool, label: bool, after: bool) -> sa.Select[Any]:
    i = items_table
    query = (
        sa.select(*(i.c[name] for name in ITEM_COLUMNS))
        .where(i.c.evaluation_id == sa.bindparam("evaluation_id"), i.c.score == sa.bindparam("score"))
        .order_by(i.c.seq)
        .limit(sa.bindparam("limit"))
    )
    if only_mismatches:
        # Items scored wrong, and items that could not be scored (an error, or no prediction).
        query = query.where(MISMATCH)
    if label:
        query = query.where(i.c.label_class == sa.bindparam("label"))
    if after:
        query = query.where(i.c.seq > sa.bindparam("after"))
    return query


def lock_timed_out(exc: BaseException) -> bool:
    """Whether `exc` is a write that waited out its lock wait (`EvaluationStore._writing`): SQLite's "database is
    locked", PostgreSQL's lock_timeout (55P03). Its transaction was rolled back."""
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    return getattr(exc.orig, "sqlstate", None) == "55P03" or "database is locked" in str(exc.orig)
