"""The group commit of concurrent single dispatches (core/creates.py), on a real SQLite file and a real PostgreSQL
database (`store_url`), with the local executor: dispatches that arrive together are stored in one transaction,
each caller answered with its own task or its own refusal (a bad spec, its key over max_tasks_per_key, a record
that cannot be written), nothing half-written, and the key cap exact however many calls arrive at once."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core import EventBus, InvalidArgument, Store, TaskManager, TaskStatus
from plexus_mcp_jupyter.core.creates import MAX_ON_LOOP
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.store import tasks_table

from .test_core import running_manager

QUICK = {"items": 1, "item_delay_ms": 0}
LONG = {"items": 100_000, "item_delay_ms": 5}  # runs until cancelled


def stored(manager: TaskManager) -> dict[str, tuple[str, str | None]]:
    """Every stored task: id -> (status, owner)."""
    with manager.store.engine.connect() as conn:
        rows = conn.execute(sa.select(tasks_table.c.id, tasks_table.c.status, tasks_table.c.owner))
        return {row[0]: (row[1], row[2]) for row in rows}


async def test_concurrent_dispatches_share_a_commit_and_each_gets_its_own_answer(store_url):
    async with running_manager(store_url, max_concurrency=2) as manager:
        groups_before = manager._creates.groups
        calls = [manager.adispatch("demo", QUICK, owner="alice") for _ in range(12)]
        calls.insert(5, manager.adispatch("demo", {"items": 0}))  # a bad spec: refused alone, before any write
        calls.insert(9, manager.adispatch("no-such-type", {}))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        refused = [a for a in answers if isinstance(a, BaseException)]
        tasks = [a for a in answers if not isinstance(a, BaseException)]
        assert len(refused) == 2 and all(isinstance(a, InvalidArgument) for a in refused), refused
        assert len(tasks) == 12 and len({t.id for t in tasks}) == 12
        assert all(t.status is TaskStatus.QUEUED for t in tasks)  # as created, whether queued or started at once
        # Each answered task is stored (a get right after finds it), and nothing else is.
        assert set(stored(manager)) == {t.id for t in tasks}
        # Gathered: on SQLite the twelve arrived in one turn of the loop (one group); on PostgreSQL the first
        # group is under way on the writer thread while the others wait, and they follow as one.
        assert manager._creates.groups - groups_before <= 2
        await manager.wait_final([t.id for t in tasks], 60)
        assert {manager.get(t.id).status for t in tasks} == {TaskStatus.COMPLETED}


async def test_the_key_cap_is_exact_when_calls_arrive_together(store_url):
    async with running_manager(store_url, max_concurrency=2, max_unfinished_per_key=3) as manager:
        first = await manager.adispatch("demo", LONG, owner="key:a")  # one unfinished before the flood
        calls = [manager.adispatch("demo", LONG, owner="key:a") for _ in range(6)]
        calls += [manager.adispatch("demo", LONG, owner="key:b") for _ in range(2)]
        calls += [manager.adispatch("demo", LONG, owner="alice") for _ in range(4)]  # not a key: no cap
        answers = await asyncio.gather(*calls, return_exceptions=True)
        a, b, other = answers[:6], answers[6:8], answers[8:]
        # key:a had one: the first two of its six are taken (in the order they came), the other four refused.
        assert [isinstance(x, BaseException) for x in a] == [False, False, True, True, True, True]
        for refusal in a[2:]:
            assert isinstance(refusal, InvalidArgument)
            assert "this API key has 3 unfinished tasks" in str(refusal) and "max_tasks_per_key" in str(refusal)
        assert not any(isinstance(x, BaseException) for x in [*b, *other])
        rows = stored(manager)
        unfinished = {"QUEUED", "RUNNING"}
        assert sum(1 for status, owner in rows.values() if owner == "key:a" and status in unfinished) == 3
        assert sum(1 for _, owner in rows.values() if owner == "key:b") == 2
        assert len(rows) == 1 + 2 + 2 + 4
        # Refused calls hold nothing: a refused key's next call is refused too, another key's goes in.
        with pytest.raises(InvalidArgument, match="max_tasks_per_key"):
            await manager.adispatch("demo", QUICK, owner="key:a")
        manager.cancel([first.id, *(t.id for t in answers if not isinstance(t, BaseException))])


async def test_a_record_that_cannot_be_written_fails_only_its_own_call(store_url):
    async with running_manager(store_url, max_concurrency=4) as manager:
        written: list[str] = []

        def record(task, conn) -> None:
            written.append(task.id)

        def refuse(task, conn) -> None:
            raise RuntimeError("the record cannot be written")

        calls = [manager.adispatch("demo", QUICK, record=record) for _ in range(6)]
        calls.insert(3, manager.adispatch("demo", QUICK, record=refuse))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        failed = answers.pop(3)
        assert isinstance(failed, RuntimeError) and "cannot be written" in str(failed)
        assert not any(isinstance(a, BaseException) for a in answers), answers
        # The group's transaction rolled back and each create went alone: six tasks, each with its record once
        # in the store (the group's attempt wrote its records too, and rolled back with them).
        assert set(stored(manager)) == {t.id for t in answers}
        assert {t.id for t in answers} <= set(written)
        await manager.wait_final([t.id for t in answers], 60)
        assert {manager.get(t.id).status for t in answers} == {TaskStatus.COMPLETED}
        assert not manager._starting  # the failed call's slot, if it held one, is free again
        again = await manager.adispatch("demo", QUICK)
        await manager.wait_final([again.id], 30)
        assert manager.get(again.id).status is TaskStatus.COMPLETED


async def test_a_caller_that_goes_away_still_gets_its_task_stored_and_run(store_url):
    async with running_manager(store_url, max_concurrency=2) as manager:
        kept = asyncio.ensure_future(manager.adispatch("demo", QUICK))
        gone = asyncio.ensure_future(manager.adispatch("demo", QUICK, description="the caller went away"))
        await asyncio.sleep(0)  # both joined the group
        gone.cancel()
        task = await kept
        with pytest.raises(asyncio.CancelledError):
            await gone
        # The cancelled call's task was stored and announced all the same: it runs to its end, not left RUNNING.
        rows = stored(manager)
        assert len(rows) == 2 and task.id in rows
        other = next(task_id for task_id in rows if task_id != task.id)
        await manager.wait_final([task.id, other], 30)
        assert manager.get(other).status is TaskStatus.COMPLETED


async def test_a_batch_joins_the_group_counted_whole_and_on_sqlite_a_big_one_is_written_off_the_loop(store_url):
    async with running_manager(store_url, max_concurrency=0, max_unfinished_per_key=MAX_ON_LOOP + 2) as manager:
        loop_thread = threading.get_ident()
        written: list[tuple[int, bool]] = []  # each group's tasks, and whether it was written on the loop
        store_creates = manager._creates.store

        def store(group):
            written.append((sum(len(entry.tasks) for entry in group), threading.get_ident() == loop_thread))
            return store_creates(group)

        manager._creates.store = store
        batch = [manager.new_task("demo", QUICK, owner="key:a") for _ in range(MAX_ON_LOOP + 1)]
        over = [manager.new_task("demo", QUICK, owner="key:a") for _ in range(2)]
        answers = await asyncio.gather(
            manager.adispatch("demo", QUICK, owner="key:a"),
            manager.acreate_batch(batch),
            manager.acreate_batch(over),  # one slot left: refused whole
            return_exceptions=True,
        )
        assert isinstance(answers[2], InvalidArgument), answers
        assert f"has {MAX_ON_LOOP + 2} unfinished tasks and asks for 2 more" in str(answers[2])
        assert set(stored(manager)) == {answers[0].id, *(t.id for t in batch)}
        # One group; on SQLite on a thread (too big for the loop), on PostgreSQL on the writer thread. A lone
        # create after it is written on the loop on SQLite.
        await manager.adispatch("demo", QUICK, owner="alice")
        sqlite = manager.store.engine.dialect.name == "sqlite"
        assert written == [(MAX_ON_LOOP + 4, False), (1, sqlite)]


def insert_held(manager: TaskManager, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold the next group's store work after its key-cap counts, before its insert: `paused` is set once it
    waits there, and it goes on once `go` is set. The single dispatch raced against it sets `go` once it has
    built its task (`new_task`): before any count of its own, if its count and insert are in line with the group."""
    paused, go = threading.Event(), threading.Event()
    create_group, new_task = manager.store.create_group, manager.new_task

    def held(tasks, also) -> None:
        if not paused.is_set():
            paused.set()
            go.wait(30)
        create_group(tasks, also)

    def releasing(*args, **kwargs):
        task = new_task(*args, **kwargs)
        go.set()
        return task

    monkeypatch.setattr(manager.store, "create_group", held)
    monkeypatch.setattr(manager, "new_task", releasing)
    return paused, go


async def cap_raced(manager: TaskManager, monkeypatch: pytest.MonkeyPatch, dispatch) -> None:
    """A batch filling key:a's cap is written off the loop (a thread on SQLite: more than MAX_ON_LOOP tasks; the
    writer thread on PostgreSQL) and held between its count and its insert while `dispatch` (one more task of
    key:a) runs: it is refused in the cap's words, and the key holds its cap, never one more."""
    cap = manager.max_unfinished_per_key
    batch = [manager.new_task("demo", QUICK, owner="key:a") for _ in range(cap)]
    paused, go = insert_held(manager, monkeypatch)
    try:
        writing = asyncio.ensure_future(manager.acreate_batch(batch))
        assert await asyncio.to_thread(paused.wait, 30), "the batch's group never reached its insert"
        with pytest.raises(InvalidArgument, match=f"this API key has {cap} unfinished tasks, more than the {cap} "):
            await dispatch()
        await writing
    finally:
        go.set()
    assert sorted(owner for _, owner in stored(manager).values()) == ["key:a"] * cap


async def test_a_dispatch_before_the_manager_starts_is_counted_in_line_with_a_group(store_url, monkeypatch):
    # Jupyter Server listens before it starts its extensions: a REST or MCP call may reach the manager before
    # `start`, beside a batch that is being written off the loop. Its count must not slip between the batch's.
    store = Store(store_url)
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=0, max_unfinished_per_key=MAX_ON_LOOP + 1)
    try:
        await cap_raced(manager, monkeypatch, lambda: manager.adispatch("demo", QUICK, owner="key:a"))
        await manager.start()  # and it starts as usual afterwards
    finally:
        await manager.stop()
        store.close()


async def test_an_in_process_dispatch_is_counted_in_line_with_a_group_written_off_the_loop(store_url, monkeypatch):
    # TaskManager.dispatch (synchronous, on the loop: in-process callers) while a group is written on a thread.
    async with running_manager(store_url, max_concurrency=0, max_unfinished_per_key=MAX_ON_LOOP + 1) as manager:

        async def dispatch():
            return manager.dispatch("demo", QUICK, owner="key:a")

        await cap_raced(manager, monkeypatch, dispatch)
