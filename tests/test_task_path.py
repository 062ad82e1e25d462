"""A small task's fixed cost on the server (issue 12): its end and its successor's claim commit together
(Store.save_progress_many with a Claim), and the per-task writes run on the driver (store._OnDriver: SQLite,
PostgreSQL), storing exactly the rows SQLAlchemy would."""

from __future__ import annotations

import functools
import sqlite3
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core import EventBus, Store, TaskManager, TaskStatus
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.models import ProgressSample, Stage, StageStatus, Task
from plexus_mcp_jupyter.core.store import Claim, ProgressWrite

from .conftest import poll

TRIVIAL = {"items": 1, "item_delay_ms": 0}


async def queue_and_run(manager: TaskManager, store: Store, n: int) -> list[Task]:
    """Start `manager`, queue `n` trivial tasks at once (as a batch does), wait for them, stop; the tasks."""
    await manager.start()
    try:
        await poll(lambda: manager.executor.status()["idle_workers"], bool)
        tasks = [manager.new_task("demo", TRIVIAL) for _ in range(n)]
        manager.queue_changing()
        store.create_tasks(tasks)
        manager.announce(tasks)
        await manager.wait_final([t.id for t in tasks], 60)
        assert [store.get_task(t.id).status for t in tasks] == [TaskStatus.COMPLETED] * n
    finally:
        await manager.stop()
        store.close()
    return tasks


async def test_an_end_and_the_next_claim_commit_in_one_transaction(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'path.db'}")
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=1, poll_interval=30)
    alone: list[list[str]] = []  # claims committed on their own
    riding: list[tuple[list[str], set[str]]] = []  # (tasks ending, tasks claimed) in one transaction
    claim_many, claim_planned, save_many = store.claim_many, store.claim_planned, store.save_progress_many

    def counted_claim(ids: Any, **kw: Any) -> set[str]:
        alone.append(list(ids))
        return claim_many(ids, **kw)

    def counted_planned(plan: Any, **kw: Any) -> Any:  # a pass's own claim, planned against what is claimable
        result = claim_planned(plan, **kw)
        if result[1]:  # (planned, claimed by this call, found gone)
            alone.append(sorted(result[1]))
        return result

    def counted_save(writes: Any, *, claim: Claim | None = None, **kw: Any) -> set[str]:
        lost = save_many(writes, claim=claim, **kw)
        if claim is not None:
            riding.append(([w.task.id for w in writes if w.final], set(claim.won)))
        return lost

    store.claim_many, store.claim_planned, store.save_progress_many = counted_claim, counted_planned, counted_save
    tasks = await queue_and_run(manager, store, 10)
    # One slot: the first task is claimed by a pass of its own; each end after that carries the next claim.
    assert alone == [[tasks[0].id]]
    ended_then_claimed = [(ended, won) for ended, won in riding if won]
    assert [won for _, won in ended_then_claimed] == [{t.id} for t in tasks[1:]]
    assert [ended for ended, _ in ended_then_claimed] == [[t.id] for t in tasks[:-1]]


def _rows(path: Any) -> dict[str, list[tuple[Any, ...]]]:
    if isinstance(path, str):  # a PostgreSQL database's URL
        engine = sa.create_engine(path, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return {
                    table: [tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1, 2")]
                    for table in ("tasks", "task_stages", "progress_samples")
                }
        finally:
            engine.dispose()
    with sqlite3.connect(path) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("tasks", "task_stages", "progress_samples")
        }


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_driver_writes_store_what_sqlalchemy_stores(tmp_path, request, dialect):
    """The same claim, progress and final writes through the driver and through SQLAlchemy leave equal rows:
    JSON (a None output is SQL NULL, text with quotes and non-ASCII), booleans, floats, NULLs. On PostgreSQL
    the claim's first round (UPDATE ... RETURNING) too, and writes of a few rows (a statement each) and more
    (psycopg's executemany)."""
    at = time.time()
    ids = [str(uuid.UUID(int=i)) for i in range(3)]
    paths = []
    for on_driver in (True, False):
        if dialect == "sqlite":
            path = tmp_path / f"{on_driver}.db"
            url = f"sqlite:///{path}"
        else:
            cluster = request.getfixturevalue("postgres_cluster")
            path = url = cluster.create_database()
            request.addfinalizer(functools.partial(cluster.drop_database, url))
        store = Store(url)
        assert store._on_driver is not None  # its writes go to the driver unless set to None below
        if not on_driver:
            store._on_driver = None  # every statement through SQLAlchemy, as with echo or another database
        tasks = [
            Task(
                id=task_id,
                type="demo",
                status=TaskStatus.QUEUED,
                params={"items": i, "text": 'a "quoted" é'},
                description="d",
                created_at=at + i,
            )
            for i, task_id in enumerate(ids)
        ]
        store.create_task(tasks[0])
        store.create_tasks(tasks[1:])
        planned = store.claim_planned(
            lambda gone: [task_id for task_id in ids[:2] if task_id not in gone],
            worker="srv",
            started_at=at,
            lease_expires_at=at + 30,
            order=ids[:2],
        )
        assert planned == (ids[:2], set(ids[:2]), set())
        assert store.claim_many(ids[2:], worker="srv", started_at=at, lease_expires_at=at + 30) == set(ids[2:])
        writes = []
        for i, task in enumerate(tasks):
            task.worker, task.current_stage = "srv/pid=1", "Work"
            task.stages = [Stage("Work", 0, StageStatus.RUNNING, "m é", 3, i, at, None, None)]
            samples = [ProgressSample(at, "Work", i, 3, None)]
            final = i > 0
            if final:
                task.status, task.completed_at = (TaskStatus.COMPLETED, TaskStatus.FAILED)[i - 1], at + 1
                task.output = None if i == 1 else {"ok": True, "text": "ü"}
                task.error_details = {"exception_type": "E"} if i == 2 else None
            writes.append(ProgressWrite(task, task.stages, samples, final))
        second = Claim([], "srv", at)
        assert store.save_progress_many(writes, holder="srv", claim=second) == set()
        assert second.won == set()
        back = store.get_task(ids[2])
        assert (back.status, back.error_details, back.output) == (
            TaskStatus.FAILED,
            {"exception_type": "E"},
            {"ok": True, "text": "ü"},
        )
        store.close()
        paths.append(path)
    assert _rows(paths[0]) == _rows(paths[1])


def test_a_driver_write_that_fails_rolls_back_its_transaction_and_raises_sqlalchemys_error(store_url):
    store = Store(store_url)
    try:
        task, other = (Task(id=str(uuid.uuid4()), type="demo", status=TaskStatus.QUEUED, params={}) for _ in "ab")
        store.create_task(task)
        with pytest.raises(sa.exc.IntegrityError):
            store.create_task(task)  # the same id twice
        store.create_task(other)
        assert [t.id for t in store.tasks_by_ids([task.id])] == [task.id]
        store.claim_many([task.id, other.id], worker="srv", started_at=time.time())
        task.status, task.completed_at, task.worker = TaskStatus.COMPLETED, time.time(), "srv/pid=1"
        other.worker = "srv/pid=1"
        bad_stage = Stage("S", 0, StageStatus.RUNNING, None, None, 0, None, None, None)
        bad_stage.name = None  # NOT NULL: the other task's stage upsert fails after the task's final UPDATE ran
        with pytest.raises(sa.exc.IntegrityError):
            store.save_progress_many(
                [ProgressWrite(task, [], [], True), ProgressWrite(other, [bad_stage], [])], holder="srv"
            )
        assert store.get_task(task.id).status is TaskStatus.RUNNING  # the UPDATE before it was rolled back
    finally:
        store.close()


async def test_the_wal_is_checkpointed_by_the_stores_thread_not_by_a_commit(tmp_path):
    """A commit never copies the WAL back (that fsync stalled the loop up to 50 ms): the store's checkpointer
    thread does, within its interval, although the WAL is far below SQLite's own threshold."""
    path = tmp_path / "wal.db"
    store = Store(f"sqlite:///{path}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() > 10_000
        checkpointer = store._checkpointer._thread
        assert checkpointer.is_alive() and checkpointer.name == "plexus-sqlite-checkpoint"
        before = path.stat().st_size
        tasks = [Task(id=str(uuid.uuid4()), type="demo", status=TaskStatus.QUEUED, params={}) for _ in range(300)]
        for task in tasks:
            store.create_task(task)  # a few hundred KB of WAL: SQLite alone would not checkpoint before 1,000 pages
        await poll(lambda: path.stat().st_size, lambda size: size > before + 100_000)
        assert len(store.tasks_by_ids([t.id for t in tasks])) == 300
    finally:
        store.close()
    assert not checkpointer.is_alive()


async def test_a_task_that_ends_in_the_write_of_its_progress_publishes_its_end_not_its_past_moments(tmp_path):
    """Events wait for the write that stores them; when that write is a task's end, the moments it reported
    before (its stages, its progress) are superseded: subscribers get the start and the end, whose summary has
    the final stage and counts. A task whose progress is written before its end still reports it live."""
    store = Store(f"sqlite:///{tmp_path / 'events.db'}")
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=2, poll_interval=30)
    await manager.start()
    try:
        await poll(lambda: manager.executor.status()["idle_workers"], lambda n: n >= 2)
        await poll(lambda: manager._queue_empty, bool)  # a dispatch starts its task at once
        seen: list[tuple[str, str, str | None]] = []
        manager.bus.add_listener(lambda e: seen.append((e.entity_id, e.kind, e.data["current_stage"])))
        quick = manager.dispatch("demo", TRIVIAL)
        time.sleep(1.5)  # the loop is busy while the task runs and ends: its messages arrive together
        slow = manager.dispatch("demo", {"items": 2, "item_delay_ms": 200})
        await manager.wait_final([quick.id, slow.id], 60)
        final = store.get_task(quick.id)
    finally:
        await manager.stop()
        store.close()
    assert [(kind, stage) for task_id, kind, stage in seen if task_id == quick.id] == [
        ("task.created", None),
        ("task.updated", None),
        ("task.completed", "Finalizing"),
    ]
    assert [s.name for s in final.stages] == ["Setup", "Processing", "Finalizing"]
    slow_stages = [stage for task_id, kind, stage in seen if task_id == slow.id and kind == "task.stage"]
    assert slow_stages == ["Setup", "Processing", "Finalizing"]  # written one by one: each published


async def test_a_pass_that_cannot_be_planned_with_a_write_leaves_the_write_and_runs_after_it(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'plan.db'}")
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=1, poll_interval=30)
    failures: list[str] = []
    plan = manager._pass_after

    def failing_once(ending: set[str]) -> Any:
        if not failures:
            failures.append(next(iter(ending)))
            raise RuntimeError("the queue could not be read")
        return plan(ending)

    manager._pass_after = failing_once
    tasks = await queue_and_run(manager, store, 3)
    assert failures == [tasks[0].id]  # the first end's write went ahead; the next start came from a pass after it


def test_a_driver_write_on_a_connection_postgresql_dropped_discards_it(postgres_url):
    """A write on the driver over a connection the database ended (a restart, an admin's terminate) fails as
    SQLAlchemy's would (an OperationalError, the connection invalidated: the store is unavailable, not broken),
    and the pool reconnects for the next one."""
    store = Store(postgres_url)
    try:
        first = Task(id=str(uuid.uuid4()), type="demo", status=TaskStatus.QUEUED, params={})
        store.create_task(first)  # on the driver (_INSERT_TASK), leaving one pooled connection
        with store.engine.connect() as conn:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})").scalar_one()
        admin.dispose()
        second = Task(id=str(uuid.uuid4()), type="demo", status=TaskStatus.QUEUED, params={})
        with pytest.raises(sa.exc.OperationalError) as failed:
            store.create_task(second)
        assert failed.value.connection_invalidated
        store.create_task(second)
        assert {t.id for t in store.tasks_by_ids([first.id, second.id])} == {first.id, second.id}
    finally:
        store.close()
