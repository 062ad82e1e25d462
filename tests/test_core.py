"""The core without any server: progress semantics, store paging, events, the demo task, the manager."""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.exc import IntegrityError

from plexus_mcp_jupyter.core import EventBus, InvalidArgument, NotFound, Store, Task, TaskManager, TaskStatus
from plexus_mcp_jupyter.core.demo import validate_params
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.models import StageStatus
from plexus_mcp_jupyter.core.progress import ProgressTracker
from plexus_mcp_jupyter.core.store import TaskFilter, decode_cursor, encode_cursor

from .conftest import poll, registered_task_types
from .processes import pid_alive


def make_task(**kw) -> Task:
    import uuid

    kw.setdefault("id", str(uuid.uuid4()))
    kw.setdefault("type", "demo")
    kw.setdefault("status", TaskStatus.QUEUED)
    return Task(**kw)


# -- progress semantics ---------------------------------------------------------------------------


def test_progress_never_decreases_and_never_exceeds_total():
    tracker = ProgressTracker(make_task(), write_interval=1.0)
    tracker.begin_stage("Processing", 100, at=0.0)
    tracker.advance_to(40, at=1.0)
    tracker.advance_to(30, at=2.0)
    assert tracker.stage.processed_items == 40
    tracker.advance_to(500, at=3.0)
    assert tracker.stage.processed_items == 100


def test_eta_appears_only_once_a_stage_is_ten_percent_done():
    tracker = ProgressTracker(make_task(), write_interval=1.0)
    tracker.begin_stage("Processing", 1000, at=100.0)
    tracker.advance_to(99, at=101.0)
    assert tracker.stage.estimated_completion_at is None
    tracker.advance_to(100, at=102.0)
    # 100 items in 2 s -> 50 items/s -> 900 left take 18 s
    assert tracker.stage.estimated_completion_at == pytest.approx(120.0)
    assert tracker.task.estimated_completion_at == tracker.stage.estimated_completion_at


def test_writes_are_throttled_but_stage_changes_and_the_end_are_always_written():
    tracker = ProgressTracker(make_task(), write_interval=1.0)
    assert tracker.begin_stage("Setup", 3, at=0.0).write
    assert not tracker.advance_to(1, at=0.1).write
    assert not tracker.advance_to(2, at=0.5).write
    assert tracker.advance_to(3, at=1.2).write
    change = tracker.begin_stage("Processing", 10, at=1.3)
    assert change.write and change.sample is not None
    assert [s.name for s in change.changed_stages] == ["Setup", "Processing"]
    assert change.changed_stages[0].status == StageStatus.COMPLETED
    end = tracker.finish(StageStatus.FAILED, at=1.4, message="boom")
    assert end.write and end.changed_stages[0].status == StageStatus.FAILED


# -- store ----------------------------------------------------------------------------------------


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def test_store_uses_wal_mode_on_sqlite(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'core.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_pagination_walks_every_task_once_newest_first(store):
    created = []
    for i in range(53):
        t = make_task(created_at=1000.0 + (i // 2))  # pairs share a timestamp: ties are broken by id
        store.create_task(t)
        created.append(t)
    seen, after = [], None
    while True:
        page, after = store.list_tasks(TaskFilter(), limit=10, after=after)
        seen.extend(page)
        if after is None:
            break
    assert len(seen) == 53 and len({t.id for t in seen}) == 53
    keys = [(t.created_at, t.id) for t in seen]
    assert keys == sorted(keys, reverse=True)


def test_a_cursor_is_bound_to_its_filter_and_garbage_is_refused():
    flt = TaskFilter(statuses=(TaskStatus.RUNNING,))
    cursor = encode_cursor((1.0, "abc"), flt)
    assert decode_cursor(cursor, flt) == (1.0, "abc")
    with pytest.raises(InvalidArgument, match="other filters"):
        decode_cursor(cursor, TaskFilter())
    with pytest.raises(InvalidArgument, match="invalid cursor"):
        decode_cursor("not-a-cursor!", flt)


def test_a_failed_write_leaves_no_half_written_task(store):
    from plexus_mcp_jupyter.core.models import Stage

    # The task row goes in first; the second stage collides with the first (same order): the whole
    # transaction must roll back, task row included.
    task = make_task(stages=[Stage("A", 0), Stage("B", 0)])
    with pytest.raises(IntegrityError):
        store.create_task(task)
    assert store.get_task(task.id) is None
    assert store.count_tasks(TaskFilter()) == 0


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"items": 0}, "items: Input should be greater than or equal to 1 .*; Items to process .*1 to 1,000,000"),
        ({"items": 10**9}, "items: .*1 to 1,000,000"),
        ({"items": "ten"}, "items: Input should be a valid integer"),
        ({"item_delay_ms": -1}, r"item_delay_ms: .*\(0 to 10000\)"),
        ({"items": 10, "fail_at": 11}, r"fail_at must be an item number from 1 to items \(10\)"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]; allowed: items, item_delay_ms, fail, fail_at, seed"),
        ({"fail": "yes"}, "fail: Input should be a valid boolean"),
    ],
)
def test_demo_parameters_are_checked_with_the_allowed_range_in_the_message(params, message):
    with pytest.raises(InvalidArgument, match=message):
        validate_params(params)


def test_unknown_status_names_the_allowed_ones():
    with pytest.raises(InvalidArgument, match="unknown status 'DONE'; expected one of QUEUED, RUNNING"):
        TaskStatus.parse("DONE")
    assert TaskStatus.parse("running") is TaskStatus.RUNNING


# -- events ---------------------------------------------------------------------------------------


async def test_a_slow_subscriber_gets_the_latest_state_per_entity_and_every_final_state():
    bus = EventBus()
    sub = bus.subscribe(lambda e: e.entity_type == "task")
    for i in range(1000):
        bus.publish("task.updated", "task", "a", {"processed": i})
    bus.publish("task.completed", "task", "a", {"status": "COMPLETED"})
    bus.publish("task.updated", "task", "b", {"processed": 1})
    bus.publish("key.created", "key", "k", {})
    events = sub.drain()
    assert [(e.entity_id, e.kind) for e in events] == [("a", "task.completed"), ("b", "task.updated")]
    assert events[0].seq < events[1].seq
    sub.close()
    assert bus.subscriber_count == 0


# -- the manager with real worker processes -------------------------------------------------------


@asynccontextmanager
async def running_manager(path, **kw):
    """A started TaskManager with the local executor on `path` (a store URL, or a directory for a SQLite file)."""
    store = Store(path if isinstance(path, str) else f"sqlite:///{path / 'manager.db'}")
    kw.setdefault("max_concurrency", 1)
    m = TaskManager(store, EventBus(), LocalExecutor(), cancel_grace_seconds=1.0, poll_interval=0.1, **kw)
    await m.start()
    try:
        yield m
    finally:
        await m.stop()
        store.close()


def test_manager_runs_by_priority_then_age(tmp_path):
    async def scenario():
        store = Store(f"sqlite:///{tmp_path / 'prio.db'}")
        m = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=1, poll_interval=0.1)
        started: list[str] = []
        m.bus.add_listener(
            lambda e: (
                started.append(e.entity_id) if e.data["status"] == "RUNNING" and e.entity_id not in started else None
            )
        )
        # Queue before starting the scheduler, so the order is decided by priority alone.
        low = m.dispatch("demo", {"items": 5, "item_delay_ms": 0}, priority=0)
        high = m.dispatch("demo", {"items": 5, "item_delay_ms": 0}, priority=10)
        low2 = m.dispatch("demo", {"items": 5, "item_delay_ms": 0}, priority=0)
        await m.start()
        await m.wait_final([low.id, high.id, low2.id], 30)
        await m.stop()
        store.close()
        return started, (low.id, high.id, low2.id)

    started, (low, high, low2) = asyncio.run(scenario())
    assert started == [high, low, low2]


async def test_cancelling_a_queued_task_is_immediate_and_a_finished_one_is_a_no_op(tmp_path):
    async with running_manager(tmp_path) as manager:
        blocker = manager.dispatch("demo", {"items": 10_000, "item_delay_ms": 5})
        queued = manager.dispatch("demo", {"items": 5})
        [outcome] = manager.cancel([queued.id])
        assert outcome.outcome == "cancelled" and manager.get(queued.id).status is TaskStatus.CANCELLED
        [again] = manager.cancel([queued.id])
        assert again.outcome == "already_finished" and "nothing to cancel" in again.message
        [missing] = manager.cancel(["no-such-task"])
        assert missing.outcome == "not_found"
        manager.cancel([blocker.id])
        await manager.wait_final([blocker.id], 10)
        assert manager.get(blocker.id).status is TaskStatus.CANCELLED


@pytest.fixture
def test_task_types():
    """Task types only these tests use, removed again afterwards."""
    from plexus_mcp_jupyter.core.tasks import TaskType

    with registered_task_types(
        TaskType("stubborn", "tests.task_functions:stubborn", "ignores cancellation"),
        TaskType("big_output", "tests.task_functions:big_output", "large output"),
        TaskType("circular", "tests.task_functions:circular", "unserialisable output"),
        TaskType("resumable", "tests.task_functions:long_idempotent", "idempotent", idempotent=True),
    ):
        yield


async def test_a_task_that_ignores_cancellation_is_killed_after_the_grace_period(tmp_path, test_task_types):
    async with running_manager(tmp_path) as manager:
        task = manager.dispatch("stubborn", {})
        await poll(lambda: manager.get(task.id).current_stage, lambda s: s == "Stubborn")
        pid = manager.executor.pid(task.id)
        assert pid is not None
        manager.cancel([task.id])
        await manager.wait_final([task.id], 10)
        done = manager.get(task.id)
        assert done.status is TaskStatus.CANCELLED
        assert "grace period" in done.error_message
        await poll(lambda: pid_alive(pid), lambda alive: not alive, timeout=5)


async def test_get_unknown_task_raises_not_found(tmp_path):
    async with running_manager(tmp_path) as manager:
        with pytest.raises(NotFound, match="no task with id 'nope'"):
            manager.get("nope")


async def test_large_outputs_are_truncated_and_log_tails_are_kept(tmp_path, test_task_types):
    async with running_manager(tmp_path, max_output_bytes=1000) as manager:
        task = manager.dispatch("big_output", {})
        await manager.wait_final([task.id], 20)
        done = manager.store.get_task(task.id)  # what was persisted, not the in-memory copy
    assert done.status is TaskStatus.COMPLETED
    assert done.output["truncated"] is True and done.output["size_bytes"] > 200_000
    assert len(done.output["preview"]) <= 1000
    assert "hello from the task's stdout" in done.stdout_tail
    assert "a line for the task's stderr tail" in done.stderr_tail


def test_a_small_output_is_what_its_json_says_whether_or_not_it_is_given_back_as_it_is():
    """bounded_output gives a scalar of JSON's own types back as it is (no json.loads), a dict or list as a copy
    (its checked text loaded: a thread the task left behind cannot change it after the check): every value comes
    back as its JSON text loads, of the same types (tuples as lists, int keys as str, an int enum as int,
    what JSON cannot express as its str), and a large one truncated as before."""
    import enum
    import json

    from plexus_mcp_jupyter.core.output import bounded_output

    class Level(enum.IntEnum):
        HIGH = 2

    def typed(value):  # the value with every type spelled out: equal values of other types differ
        if isinstance(value, dict):
            return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
        if isinstance(value, list):
            return ("list", [typed(v) for v in value])
        return (type(value).__name__, value if value == value else "nan")

    plain = {"pid": 123, "ok": True, "none": None, "x": 1.5, "nan": float("nan"), "items": [1, "a", {"b": [None]}]}
    others = [(1, 2), {1: "a"}, {"level": Level.HIGH}, {"at": __import__("datetime").date(2026, 1, 2)}, [b"x"]]
    for value in [plain, "text", 7, None, [], {}, *others]:
        assert typed(bounded_output(value, 65_536)) == typed(json.loads(json.dumps(value, default=str)))
    assert bounded_output(plain, 65_536) is not plain  # a copy of what was checked
    text = "x" * 40
    assert bounded_output(text, 65_536) is text  # immutable: given back
    assert bounded_output({"k": "x" * 100}, 50)["truncated"] is True


async def test_a_per_owner_cap_lets_other_owners_through(tmp_path):
    async with running_manager(tmp_path, max_concurrency=2, max_concurrency_per_owner=1) as manager:
        a1 = manager.dispatch("demo", {"items": 10_000, "item_delay_ms": 5}, owner="alice")
        a2 = manager.dispatch("demo", {"items": 5, "item_delay_ms": 0}, owner="alice")
        b1 = manager.dispatch("demo", {"items": 5, "item_delay_ms": 0}, owner="bob")
        await manager.wait_final([b1.id], 20)
        assert manager.get(b1.id).status is TaskStatus.COMPLETED  # bob was not held up behind alice
        assert manager.get(a2.id).status is TaskStatus.QUEUED  # alice's second waits for her first
        manager.cancel([a1.id])
        await manager.wait_final([a1.id, a2.id], 20)
        assert manager.get(a2.id).status is TaskStatus.COMPLETED


async def test_an_output_json_cannot_express_still_completes_with_a_note(tmp_path, test_task_types):
    async with running_manager(tmp_path) as manager:
        task = manager.dispatch("circular", {})
        await manager.wait_final([task.id], 20)
        done = manager.store.get_task(task.id)
    assert done.status is TaskStatus.COMPLETED
    assert done.output["truncated"] is True and "not JSON-serialisable" in done.output["error"]


async def test_stopping_the_server_fails_running_tasks_and_requeues_idempotent_ones(tmp_path, test_task_types):
    store = Store(f"sqlite:///{tmp_path / 'stop.db'}")
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=2, cancel_grace_seconds=1.0)
    await manager.start()
    plain = manager.dispatch("demo", {"items": 100_000, "item_delay_ms": 5})
    resumable = manager.dispatch("resumable", {})
    await poll(lambda: [manager.get(t.id).current_stage for t in (plain, resumable)], lambda stages: all(stages))
    await manager.stop()
    stopped, requeued = store.get_task(plain.id), store.get_task(resumable.id)
    store.close()
    assert stopped.status is TaskStatus.FAILED  # not CANCELLED: nobody asked for that
    assert stopped.error_message == "the server stopped while the task was running"
    assert requeued.status is TaskStatus.QUEUED and requeued.stages == [] and requeued.worker is None


def test_a_claim_by_an_earlier_server_with_our_process_id_counts_as_gone(tmp_path):
    from plexus_mcp_jupyter.core.manager import HOST, _owner_gone

    assert _owner_gone(f"local:{HOST}:{os.getpid()}:oldinstance/pid=1", own_instance="newinstance")
    assert not _owner_gone(f"local:{HOST}:{os.getpid()}:me/pid=1", own_instance="me")
    assert not _owner_gone("local:another-host:1:x/pid=1", own_instance="me")
    assert _owner_gone(None, own_instance="me")


async def test_a_capped_owner_with_a_long_queue_does_not_starve_others(tmp_path):
    async with running_manager(tmp_path, max_concurrency=2, max_concurrency_per_owner=1) as manager:
        first = manager.dispatch("demo", {"items": 100_000, "item_delay_ms": 5}, owner="alice")
        for _ in range(80):  # more than the scheduler looks at in one pass
            manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}, owner="alice")
        bob = manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}, owner="bob")
        await manager.wait_final([bob.id], 20)
        assert manager.get(bob.id).status is TaskStatus.COMPLETED
        manager.cancel([first.id])


def test_a_store_made_by_an_older_release_gets_the_columns_it_lacks(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table(
        "tasks",
        old,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("type", sa.String(64)),
        sa.Column("status", sa.String(16)),
        sa.Column("priority", sa.Integer),
        sa.Column("created_at", sa.Float),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
    )
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO tasks (id, type, status, priority, created_at, cancel_requested) "
                "VALUES ('t1', 'demo', 'COMPLETED', 0, 1.0, 0)"
            )
        )
    engine.dispose()
    store = Store(url)
    try:
        task = store.get_task("t1")
        assert task.status is TaskStatus.COMPLETED and task.owner is None
        assert "owner" in {c["name"] for c in sa.inspect(store.engine).get_columns("tasks")}
    finally:
        store.close()


def test_a_core_message_quoting_a_huge_value_is_bounded_with_its_quote_cut():
    from plexus_mcp_jupyter.core.errors import MAX_MESSAGE_CHARS, bounded

    message = bounded("unknown evaluation status '" + "X" * 100_000 + "'; expected one of COMPLETED, FAILED")
    assert len(message) < 200 and message.endswith("XXX...'")
    assert bounded("status 'abc' is bad") == "status 'abc' is bad"
    assert len(bounded("y" * 100_000)) == MAX_MESSAGE_CHARS


def test_a_rehearsed_create_waits_for_a_lock_held_elsewhere_its_lock_wait_at_most(store_url):
    """`rehearse_create_task(lock_wait=...)` (the start-up rehearsals') fails once it has waited that long for a
    lock another connection holds (SQLite: a write transaction, the connection's busy timeout; PostgreSQL: a table
    lock, its transaction's lock timeout), not after the store's own (5 s; 30 s); the next statements on the same
    pooled connection wait as long as before."""
    import time

    import sqlalchemy as sa

    from plexus_mcp_jupyter.core.store import SQLITE_BUSY_MS

    store = Store(store_url, pool_size=1)
    try:
        store.rehearse_create_task(make_task(), holder="s1", lock_wait=0.3)  # unlocked: runs, stores nothing
        holder = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
        with holder.connect() as other:
            if store.engine.dialect.name == "sqlite":
                other.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                other.begin()
                other.exec_driver_sql("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(Exception, match=r"(?i)locked|timeout"):
                store.rehearse_create_task(make_task(), holder="s1", lock_wait=0.3)
            waited = time.monotonic() - began
            if store.engine.dialect.name == "sqlite":
                other.exec_driver_sql("ROLLBACK")
            else:
                other.rollback()
        holder.dispose()
        assert 0.25 < waited < 2.5, waited  # before: the store's 5 s (SQLite), 30 s (PostgreSQL)
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as conn:  # the pool's one connection: its busy timeout given back
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_MS
    finally:
        store.close()
