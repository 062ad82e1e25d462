"""The same store code on SQLite and PostgreSQL: every store method whose SQL differs between the two (upserts,
RETURNING, booleans, JSON, float timestamps, LIKE and prefixes, partial indexes, row locks), each test run on a
real SQLite file and a real PostgreSQL database (tests/postgres.py, the `store_url` fixture)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.models import ProgressSample, Stage, StageStatus, Task, TaskStatus
from plexus_mcp_jupyter.core.store import _CLAIM_FIRST_QUEUED, ProgressWrite, Store, TaskFilter
from plexus_mcp_jupyter.evaluations.store import EvaluationStore, ItemFilter
from plexus_mcp_jupyter.security.audit import AuditLog
from plexus_mcp_jupyter.security.identity import LOCAL_ADMIN
from plexus_mcp_jupyter.security.keys import KeyStore


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def queued(n: int, **kw) -> list[Task]:
    base = time.time()
    return [
        Task(id=uuid.uuid4().hex, type="demo", status=TaskStatus.QUEUED, created_at=base + i * 1e-3, **kw)
        for i in range(n)
    ]


def drain_with_two_stores(store_url: str, n: int, claim: Callable[[Store, str, list[Task]], list[str]]) -> None:
    """Two Store instances (two pools, as two servers have) drain one queue of `n` tasks concurrently, each reading
    the head of the queue (40 tasks) and claiming from it with `claim(store, worker, head)` (the ids it claimed),
    until the queue is empty: every task is claimed once, by one of them, both claim some, and the rows say who.

    Deterministic under load: both read the first head before either claims (the same head, claimed from at
    once), and one that has claimed waits (up to a deadline) until the other has claimed too before it goes on, so
    a thread the machine leaves unscheduled cannot find the queue drained by the other."""
    first, second = Store(store_url), Store(store_url)
    first.create_tasks(queued(n))
    claimed: dict[str, list[str]] = {"a": [], "b": []}
    has_claimed = {"a": threading.Event(), "b": threading.Event()}
    failures: list[BaseException] = []
    both_read = threading.Barrier(2, timeout=60)

    def drain(name: str, other: str, store: Store) -> None:
        try:
            window = store.queue_window(per_owner=40, limit=40)[0]
            both_read.wait()
            while window:
                got = claim(store, name, window)
                claimed[name] += got
                if got:
                    has_claimed[name].set()
                if has_claimed[name].is_set() and not has_claimed[other].wait(60):
                    raise AssertionError(f"{other} claimed nothing in 60 s while {name} waited")
                window = store.queue_window(per_owner=40, limit=40)[0]
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            both_read.abort()
            has_claimed[name].set()  # the other stops waiting; the failure is reported

    threads = [
        threading.Thread(target=drain, args=(name, other, s))
        for name, other, s in (("a", "b", first), ("b", "a", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not any(thread.is_alive() for thread in threads), "a store still draining after 120 s"
        assert not failures, failures
        both = claimed["a"] + claimed["b"]
        assert len(both) == n and len(set(both)) == n  # every task claimed, none twice
        assert claimed["a"] and claimed["b"]  # both made progress
        with first.engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT worker, COUNT(*) FROM tasks GROUP BY worker")).all())
        assert rows == {"a": len(claimed["a"]), "b": len(claimed["b"])}  # the row says who won
    finally:
        first.close()
        second.close()


def test_two_stores_claiming_the_same_queue_at_once_never_claim_a_task_twice(store_url):
    # The claim is a conditional UPDATE (FOR UPDATE SKIP LOCKED on PostgreSQL, one writer transaction on SQLite).
    def claim_each(store: Store, name: str, head: list[Task]) -> list[str]:
        return [task.id for task in head if store.claim(task.id, worker=name, started_at=time.time())]

    drain_with_two_stores(store_url, 1000, claim_each)


def test_two_stores_planning_from_the_same_head_claim_different_tasks_and_lose_no_claim(store_url):
    # Each plans the first four of the head it read each time (Store.claim_planned, with the plan's order): what the
    # other took or is taking is planned around in the claim's transaction, so every claim made is won, and
    # neither reads the queue again for a claim it lost.
    def claim_planned(store: Store, name: str, head: list[Task]) -> list[str]:
        out: list[str] = []
        while head:
            order = [task.id for task in head]
            ids, won, gone = store.claim_planned(
                lambda gone, order=order: [i for i in order if i not in gone][:4],
                worker=name,
                started_at=time.time(),
                order=order,
            )
            assert won == set(ids) and not won & gone, (ids, won, gone)
            out += ids
            head = [task for task in head if task.id not in won | gone]
        return out

    drain_with_two_stores(store_url, 600, claim_planned)


def test_a_planned_claim_passes_over_a_task_being_claimed_and_never_claims_beyond_the_plan(store):
    # PostgreSQL: another transaction holds b's row (a server claiming it right now). The first round claims the
    # first two free tasks of the order (a, c) in one statement and finds b gone. When the plan made without b
    # would start neither, that claim is undone and nothing beyond the plan is claimed.
    if store.engine.dialect.name != "postgresql":
        pytest.skip("row locks held by another transaction: PostgreSQL (SQLite serialises whole writers)")
    a, b, c, d = tasks = queued(4)
    store.create_tasks(tasks)
    order = [t.id for t in tasks]
    with store.engine.connect() as other:
        other.begin()
        other.execute(sa.text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": b.id})
        ids, won, gone = store.claim_planned(
            lambda gone: [i for i in order if i not in gone][:2], worker="w", started_at=time.time(), order=order
        )
        assert (ids, won, gone) == ([a.id, c.id], {a.id, c.id}, {b.id})
        ids, won, gone = store.claim_planned(
            lambda gone: [] if gone else [d.id, b.id], worker="w", started_at=time.time(), order=[d.id, b.id]
        )
        assert (ids, won, gone) == ([], set(), {b.id})  # d was claimed by the first statement, then undone
        with store.engine.begin() as conn:  # in a caller's transaction (a write's): d is put back, not rolled back
            ids, won, gone = store.claim_planned(
                lambda gone: [] if gone else [d.id, b.id],
                worker="w",
                started_at=time.time(),
                order=[d.id, b.id],
                conn=conn,
            )
            assert (ids, won, gone) == ([], set(), {b.id})
        other.rollback()
    back = store.get_task(d.id)
    assert (back.status, back.worker, back.started_at, back.lease_expires_at) == (TaskStatus.QUEUED, None, None, None)
    assert [store.get_task(t.id).status for t in tasks] == [
        TaskStatus.RUNNING,
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
        TaskStatus.QUEUED,
    ]


def test_a_planned_claim_finds_its_tasks_by_id_whatever_the_statistics(store):
    # PostgreSQL: a table never analysed (a new store's first minute; any store whose queue grew since autovacuum
    # last looked) once made the planner read every QUEUED task through the partial queue index for the claim's
    # few ids, and join the UPDATE to all of them. The claim's plan now reaches tasks only by the primary key (the
    # pick) and the rows' addresses (the UPDATE of the rows picked).
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's planner")
    tasks = queued(2000)
    store.create_tasks(tasks)
    order = [t.id for t in tasks[500:537]]
    compiled = _CLAIM_FIRST_QUEUED.compile(dialect=store.engine.dialect)
    params = {**compiled.params, "order": order, "n": 4, "b_worker": "w", "b_started_at": 1.0, "b_lease": None}
    with store.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled), params).scalar_one()
    scans = []
    nodes = [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name") == "tasks" and node["Node Type"] != "ModifyTable":
            scans.append((node["Node Type"], node.get("Index Name")))
    assert sorted(scans) == [("Index Scan", "tasks_pkey"), ("Tid Scan", None)]  # the pick's probes, the UPDATE's
    ids, won, gone = store.claim_planned(lambda gone: order[:4], worker="w", started_at=time.time(), order=order)
    assert ids == order[:4] and won == set(order[:4]) and gone == set()


def test_a_write_of_several_tasks_leaves_those_held_elsewhere_or_final_alone(store):
    # One write of several tasks' ends and progress: a task another server took over is reported lost and left
    # alone, a final one is left alone, the others are written.
    tasks = queued(6)
    store.create_tasks(tasks)
    assert store.claim_many([t.id for t in tasks], worker="srv-a/1", started_at=time.time()) == {t.id for t in tasks}
    mine, taken, cancelled, moving = tasks[:2], tasks[2], tasks[3], tasks[4:]
    assert store.take_over(taken.id, previous="srv-a/1", worker="srv-b/1", lease_expires_at=None)
    assert store.update_task(cancelled.id, status=TaskStatus.CANCELLED)
    ended = [*mine, taken, cancelled]
    for i, task in enumerate(ended):
        task.worker, task.status, task.completed_at = "srv-a/1", TaskStatus.COMPLETED, time.time()
        task.output = {"i": i, "text": 'a "quoted" é'} if i else None
    eta = time.time() + 5
    for task in moving:
        task.worker, task.current_stage, task.estimated_completion_at = "srv-a/1", "Work", eta
    writes = [ProgressWrite(t, [], [], final=True) for t in ended] + [ProgressWrite(t, [], []) for t in moving]
    assert store.save_progress_many(writes, holder="srv-a") == {taken.id}
    got = {t.id: t for t in store.tasks_by_ids([t.id for t in tasks])}
    assert [got[t.id].status for t in tasks] == [TaskStatus.COMPLETED] * 2 + [
        TaskStatus.RUNNING,
        TaskStatus.CANCELLED,
        TaskStatus.RUNNING,
        TaskStatus.RUNNING,
    ]
    assert [got[t.id].output for t in mine] == [None, {"i": 1, "text": 'a "quoted" é'}]
    assert got[taken.id].worker == "srv-b/1" and got[cancelled.id].output is None
    assert {(got[t.id].current_stage, got[t.id].estimated_completion_at) for t in moving} == {("Work", eta)}


def test_a_write_of_several_tasks_writes_a_row_changed_while_it_waited_for_its_lock(store):
    # PostgreSQL: another transaction changes a task's row (its lease renewed) while the write waits for that row's
    # lock: the write's UPDATE then applies to the row's new version. (An UPDATE of several rows in one statement,
    # joined to them by address, tried for issue 13, lost such an end while the server took it as written; its
    # server then renewed the task's lease for ever.)
    if store.engine.dialect.name != "postgresql":
        pytest.skip("row locks held by another transaction: PostgreSQL (SQLite serialises whole writers)")
    tasks = queued(3)
    store.create_tasks(tasks)
    assert store.claim_many([t.id for t in tasks], worker="srv/1", started_at=time.time()) == {t.id for t in tasks}
    for task in tasks:
        task.worker, task.status, task.completed_at = "srv/1", TaskStatus.COMPLETED, time.time()
    lost: list[set[str]] = []
    writer = threading.Thread(
        target=lambda: lost.append(
            store.save_progress_many([ProgressWrite(t, [], [], final=True) for t in tasks], holder="srv")
        )
    )
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    another = sa.create_engine(store.engine.url, poolclass=sa.pool.NullPool)  # another server's, and a watcher's
    with another.connect() as other, another.connect() as watch:
        other.begin()
        other.execute(sa.text("UPDATE tasks SET lease_expires_at = 1 WHERE id = :id"), {"id": tasks[1].id})
        writer.start()
        deadline = time.monotonic() + 30
        while watch.exec_driver_sql(waiting).scalar_one() == 0:  # the write waits for the row's lock
            watch.rollback()  # pg_stat_activity is read once per transaction
            assert time.monotonic() < deadline, "the write never waited for the row's lock"
            time.sleep(0.01)
        other.commit()
    writer.join(30)
    another.dispose()
    assert lost == [set()]
    assert [store.get_task(t.id).status for t in tasks] == [TaskStatus.COMPLETED] * 3


def test_a_write_and_the_pass_it_calls_for_commit_together_and_a_failed_pass_leaves_the_write(store):
    # Store.save_progress_then: the claim of the next pass in the write's transaction; when the pass fails, the
    # write commits alone and the error is handed back.
    running, waiting = queued(2)
    store.create_tasks([running, waiting])
    assert store.claim(running.id, worker="srv/1", started_at=time.time())
    running.status, running.completed_at, running.worker = TaskStatus.COMPLETED, time.time(), "srv/1"

    def claim_next(conn: sa.Connection, fail: bool = False):
        got = store.claim_planned(
            lambda gone: [waiting.id], worker="srv/2", started_at=time.time(), order=[waiting.id], conn=conn
        )
        if fail:
            raise RuntimeError("the pass failed")
        return got

    lost, failed = store.save_progress_then(
        [ProgressWrite(running, [], [], final=True)], holder="srv", then=lambda conn: claim_next(conn, fail=True)
    )
    assert lost == set() and isinstance(failed, RuntimeError)
    assert [store.get_task(t.id).status for t in (running, waiting)] == [TaskStatus.COMPLETED, TaskStatus.QUEUED]
    lost, planned = store.save_progress_then([], holder="srv", then=claim_next)
    assert (lost, planned) == (set(), ([waiting.id], {waiting.id}, set()))
    assert store.get_task(waiting.id).status is TaskStatus.RUNNING


def _statements(monkeypatch) -> dict[str, int]:
    """Counts of psycopg's executes and commits from here on (psycopg begins a transaction with its first statement)."""
    import psycopg

    counts = {"execute": 0, "commit": 0}
    execute, commit = psycopg.Cursor.execute, psycopg.Connection.commit

    def counted_execute(self, *args, **kwargs):
        counts["execute"] += 1
        return execute(self, *args, **kwargs)

    def counted_commit(self):
        counts["commit"] += 1
        return commit(self)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted_execute)
    monkeypatch.setattr(psycopg.Connection, "commit", counted_commit)
    return counts


def test_ends_and_the_one_group_claim_they_call_for_are_one_statement_on_postgresql(store, monkeypatch):
    """PostgreSQL, Store.save_progress_then with ends only and a one-group claim of tasks of one type (`kind`): the
    write and the claim are ONE statement in autocommit (no BEGIN, no COMMIT, no statement per end), stored as the
    write's transaction stored them: each end with its output and trail, a task another server took over left
    alone and reported lost, one already final left alone, and the group's first free tasks claimed in order."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a one-group claim (Store.claim_group_head): PostgreSQL")
    running, waiting = queued(4), queued(4)
    store.create_tasks(running + waiting)
    assert store.claim_many([t.id for t in running], worker="srv/1", started_at=time.time()) == {t.id for t in running}
    mine, taken, cancelled = running[:2], running[2], running[3]
    assert store.take_over(taken.id, previous="srv/1", worker="other/1", lease_expires_at=None)
    assert store.update_task(cancelled.id, status=TaskStatus.CANCELLED)
    at = time.time()
    for i, task in enumerate(running):
        task.worker, task.status, task.completed_at = "srv/1", TaskStatus.COMPLETED, at + i
        task.output, task.current_stage = {"i": i, "text": 'a "quoted" é'}, "Working"
    task = mine[1]
    task.status, task.error_message, task.error_details = TaskStatus.FAILED, "boom", {"kind": "ValueError"}
    stage = Stage("Working", 0, StageStatus.COMPLETED, None, 1, 1, at, at + 0.5, None)
    samples = [ProgressSample(at, "Working", 0, 1), ProgressSample(at + 0.5, "Working", 1, 1)]
    writes = [ProgressWrite(t, [stage], samples, final=True) for t in reversed(running)]
    asked: list[list[Task]] = []

    def claim_next(conn):
        return store.claim_group_head(
            (0, None),
            2,
            lambda tasks: bool(asked.append(tasks)),  # never asked: tasks of `kind` are taken
            worker="srv/2",
            started_at=at + 9,
            lease_expires_at=at + 99,
            conn=conn,
            kind="demo",
        )

    counts = _statements(monkeypatch)
    lost, got = store.save_progress_then(writes, holder="srv", then=claim_next)
    assert counts == {"execute": 2, "commit": 0}  # the statement, and a read of who holds the two not written
    monkeypatch.undo()
    assert lost == {taken.id} and asked == []
    assert [(t.id, t.status, t.worker) for t in got] == [(t.id, TaskStatus.QUEUED, None) for t in waiting[:2]]
    stored = {t.id: t for t in store.tasks_by_ids([t.id for t in running + waiting], stages=True)}
    assert [stored[t.id].status for t in running] == [
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.RUNNING,
        TaskStatus.CANCELLED,
    ]
    assert [(stored[t.id].output, stored[t.id].completed_at, stored[t.id].stages) for t in mine] == [
        ({"i": 0, "text": 'a "quoted" é'}, at, [stage]),
        ({"i": 1, "text": 'a "quoted" é'}, at + 1, [stage]),
    ]
    assert (stored[mine[1].id].error_message, stored[mine[1].id].error_details) == ("boom", {"kind": "ValueError"})
    assert store.history(mine[0].id, limit=5) == (samples, 2)
    assert stored[taken.id].worker == "other/1" and stored[cancelled.id].output is None
    assert [(stored[t.id].status, stored[t.id].worker, stored[t.id].lease_expires_at) for t in waiting] == [
        (TaskStatus.RUNNING, "srv/2", at + 99)
    ] * 2 + [(TaskStatus.QUEUED, None, None)] * 2


def test_ends_with_a_one_group_claim_that_meets_another_type_claim_as_the_plan_says(store):
    """PostgreSQL: when the group's first tasks are not all of `kind`, the one statement claims none and the claim
    is made in a transaction, as the plan (`accept`) says; the ends are written once either way. Ends alone (no
    claim, or a pass that claims nothing) are one statement too."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a one-group claim (Store.claim_group_head): PostgreSQL")
    running, waiting = queued(3), queued(3)
    waiting[1].type = "other"
    store.create_tasks(running + waiting)
    store.claim_many([t.id for t in running], worker="srv/1", started_at=time.time())
    for task in running:
        task.worker, task.status, task.completed_at = "srv/1", TaskStatus.COMPLETED, time.time()

    def claim_next(conn, accept):
        return store.claim_group_head(
            (0, None), 2, accept, worker="srv/2", started_at=time.time(), conn=conn, kind="demo"
        )

    lost, got = store.save_progress_then(
        [ProgressWrite(running[0], [], [], final=True)],
        holder="srv",
        then=lambda conn: claim_next(conn, lambda t: False),
    )
    assert (lost, got) == (set(), None)  # refused by the plan: back to the queue
    lost, got = store.save_progress_then(
        [ProgressWrite(running[1], [], [], final=True)],
        holder="srv",
        then=lambda conn: claim_next(conn, lambda t: True),
    )
    assert lost == set() and [t.id for t in got] == [t.id for t in waiting[:2]]
    lost, none = store.save_progress_then(
        [ProgressWrite(running[2], [], [], final=True)], holder="srv", then=lambda c: 7
    )
    assert (lost, none) == (set(), 7)
    statuses = {t.id: t.status for t in store.tasks_by_ids([t.id for t in running + waiting])}
    assert [statuses[t.id] for t in running + waiting] == [TaskStatus.COMPLETED] * 3 + [TaskStatus.RUNNING] * 2 + [
        TaskStatus.QUEUED
    ]
    assert store.save_progress_many([ProgressWrite(running[0], [], [], final=True)], holder="srv") == set()


def test_a_task_the_one_statement_picked_but_did_not_claim_is_claimed_by_id_in_its_place(store, monkeypatch):
    """PostgreSQL: a task the one statement of ends and claim locked at a version its snapshot does not see (changed,
    still QUEUED, by a transaction that committed after it began: tests/test_claim_races.py drives that for the
    claims in a transaction) comes back picked and not claimed; it is claimed by id after the statement, if still
    QUEUED, and returned in its place. Simulated here: the statement's claim of the second task undone, its row
    returned unclaimed."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a one-group claim (Store.claim_group_head): PostgreSQL")
    ending, waiting = queued(1)[0], queued(3)
    store.create_tasks([ending, *waiting])
    assert store.claim(ending.id, worker="srv/1", started_at=time.time())
    ending.status, ending.completed_at, ending.worker = TaskStatus.COMPLETED, time.time(), "srv/1"
    statement = store._autocommit_rows

    def second_unclaimed(sql, params):
        rows = statement(sql, params)
        with store.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE tasks SET status = 'QUEUED', worker = NULL, started_at = NULL WHERE id = :id"),
                {"id": waiting[1].id},
            )
        return [row if row[1] != waiting[1].id else (*row[:3], *[None] * (len(row) - 3)) for row in rows]

    monkeypatch.setattr(store, "_autocommit_rows", second_unclaimed)
    lost, got = store.save_progress_then(
        [ProgressWrite(ending, [], [], final=True)],
        holder="srv",
        then=lambda conn: store.claim_group_head(
            (0, None), 2, lambda tasks: False, worker="srv/2", started_at=time.time(), conn=conn, kind="demo"
        ),
    )
    assert lost == set() and [(t.id, t.status) for t in got] == [(t.id, TaskStatus.QUEUED) for t in waiting[:2]]
    statuses = {t.id: (t.status, t.worker) for t in store.tasks_by_ids([t.id for t in [ending, *waiting]])}
    assert [statuses[t.id] for t in [ending, *waiting]] == [
        (TaskStatus.COMPLETED, "srv/1"),
        (TaskStatus.RUNNING, "srv/2"),
        (TaskStatus.RUNNING, "srv/2"),
        (TaskStatus.QUEUED, None),
    ]


def _one_statement_setup(store, n_waiting: int = 3):
    """A task srv/1 runs, ended (not written yet), and `n_waiting` QUEUED tasks of its type in group (0, None)."""
    ending, waiting = queued(1)[0], queued(n_waiting)
    store.create_tasks([ending, *waiting])
    assert store.claim(ending.id, worker="srv/1", started_at=time.time())
    ending.status, ending.completed_at, ending.worker = TaskStatus.COMPLETED, time.time(), "srv/1"
    return ending, waiting


def _claim_two(store, conn):
    return store.claim_group_head(
        (0, None), 2, lambda tasks: False, worker="srv/2", started_at=time.time(), conn=conn, kind="demo"
    )


def test_the_one_statement_picks_the_queue_after_its_ends_so_a_locked_end_holds_no_queued_row(store):
    """PostgreSQL: while an end's row is locked elsewhere (a lease renewal, a take-over), the one statement of ends
    and claim waits for it BEFORE it picks the group's head: the queued rows stay free, another server claims them
    meanwhile (SKIP LOCKED), and the statement then claims what is left, in order."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a one-group claim (Store.claim_group_head): PostgreSQL")
    ending, waiting = _one_statement_setup(store, 4)
    result: dict[str, object] = {}
    with store.engine.connect() as locker:
        locker.execute(sa.text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": ending.id})

        def run() -> None:
            result["got"] = store.save_progress_then(
                [ProgressWrite(ending, [], [], final=True)], holder="srv", then=lambda conn: _claim_two(store, conn)
            )

        thread = threading.Thread(target=run)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            waiting_sql = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            while True:  # a transaction each read: pg_stat_activity is a snapshot for the whole of one
                with store.engine.connect() as watch:
                    if watch.execute(waiting_sql).scalar():
                        break
                assert time.monotonic() < deadline, "the statement never waited for the end's row"
                time.sleep(0.02)
            with store.engine.begin() as other:  # another server's claim while the statement waits
                free = other.execute(
                    sa.text(
                        "SELECT id FROM tasks WHERE status = 'QUEUED' ORDER BY created_at, id FOR UPDATE SKIP LOCKED"
                    )
                ).scalars()
                assert list(free) == [t.id for t in waiting]
                other.execute(
                    sa.text("UPDATE tasks SET status = 'RUNNING', worker = 'other/1' WHERE id = :id"),
                    {"id": waiting[0].id},
                )
        finally:
            locker.rollback()
            thread.join(20)
    lost, got = result["got"]
    assert lost == set() and [t.id for t in got] == [t.id for t in waiting[1:3]]
    statuses = {t.id: (t.status, t.worker) for t in store.tasks_by_ids([t.id for t in [ending, *waiting]])}
    assert [statuses[t.id] for t in [ending, *waiting]] == [
        (TaskStatus.COMPLETED, "srv/1"),
        (TaskStatus.RUNNING, "other/1"),
        (TaskStatus.RUNNING, "srv/2"),
        (TaskStatus.RUNNING, "srv/2"),
        (TaskStatus.QUEUED, None),
    ]


def test_a_failure_after_the_one_statement_committed_puts_its_claims_back(store, monkeypatch):
    """PostgreSQL: what follows the one statement of ends and claim failing (here the read of a claimed row) hands
    the exception back with the ends standing, and the claims it committed, which nobody would start, put back
    QUEUED."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a one-group claim (Store.claim_group_head): PostgreSQL")
    from plexus_mcp_jupyter.core import store as store_module

    ending, waiting = _one_statement_setup(store)

    def broken(row):
        raise RuntimeError("injected")

    monkeypatch.setattr(store_module, "_task_from_tuple", broken)
    lost, failed = store.save_progress_then(
        [ProgressWrite(ending, [], [], final=True)], holder="srv", then=lambda conn: _claim_two(store, conn)
    )
    monkeypatch.undo()
    assert lost == set() and isinstance(failed, RuntimeError)
    statuses = {t.id: (t.status, t.worker) for t in store.tasks_by_ids([t.id for t in [ending, *waiting]])}
    assert [statuses[t.id] for t in [ending, *waiting]] == [(TaskStatus.COMPLETED, "srv/1")] + [
        (TaskStatus.QUEUED, None)
    ] * 3


def test_a_failed_read_of_who_holds_the_ends_not_written_is_made_again_then_raised(store, monkeypatch):
    """PostgreSQL: the ends one statement did not write (another server holds them, or final already) are read
    after it; a failed read is made again once, and a second failure is raised (the write, made again, is
    idempotent), never taken as every such end held elsewhere (a take-over: no final event)."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("the one statement of ends: PostgreSQL")
    tasks = queued(3)
    store.create_tasks(tasks)
    store.claim_many([t.id for t in tasks], worker="srv/1", started_at=time.time())
    mine, taken, cancelled = tasks
    assert store.take_over(taken.id, previous="srv/1", worker="other/1", lease_expires_at=None)
    assert store.update_task(cancelled.id, status=TaskStatus.CANCELLED)
    for task in tasks:
        task.worker, task.status, task.completed_at = "srv/1", TaskStatus.COMPLETED, time.time()
    connect, calls = store.reads.connect, []

    def failing(fail: set[int]):
        def connect_or_fail():
            calls.append(1)
            if len(calls) in fail:
                raise sa.exc.OperationalError("SELECT", {}, Exception("injected"))
            return connect()

        return connect_or_fail

    monkeypatch.setattr(store.reads, "connect", failing({2}))  # 1: the statement; 2: the read, 3: again
    lost, _ = store.save_progress_then(
        [ProgressWrite(t, [], [], final=True) for t in tasks], holder="srv", then=lambda conn: None
    )
    assert lost == {taken.id} and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(store.reads, "connect", failing({2, 3}))
    with pytest.raises(sa.exc.OperationalError):
        store.save_progress_then(
            [ProgressWrite(t, [], [], final=True) for t in tasks], holder="srv", then=lambda conn: None
        )
    monkeypatch.undo()
    assert store.get_task(mine.id).status is TaskStatus.COMPLETED


def test_more_ends_than_one_statement_takes_go_in_a_transaction_as_before(store, monkeypatch):
    """PostgreSQL: at most ENDS_IN_ONE_MAX ends go in the one statement (12 parameters an end, 65,535 a statement at
    most); a write of more is made in a transaction (BEGIN, the writes, the claim, COMMIT), every end written."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("the one statement of ends: PostgreSQL")
    from plexus_mcp_jupyter.core import store as store_module

    monkeypatch.setattr(store_module, "ENDS_IN_ONE_MAX", 2)
    running, waiting = queued(3), queued(2)
    store.create_tasks(running + waiting)
    store.claim_many([t.id for t in running], worker="srv/1", started_at=time.time())
    for task in running:
        task.worker, task.status, task.completed_at = "srv/1", TaskStatus.COMPLETED, time.time()
    counts = _statements(monkeypatch)
    lost, got = store.save_progress_then(
        [ProgressWrite(t, [], [], final=True) for t in running], holder="srv", then=lambda conn: _claim_two(store, conn)
    )
    assert counts["commit"] == 1  # a transaction, not the statement in autocommit
    monkeypatch.undo()
    assert lost == set() and got is None  # `accept` refused the claims: put back
    statuses = {t.id: t.status for t in store.tasks_by_ids([t.id for t in running + waiting])}
    assert [statuses[t.id] for t in running + waiting] == [TaskStatus.COMPLETED] * 3 + [TaskStatus.QUEUED] * 2


@pytest.mark.parametrize("column", ["worker", "current_stage"])
def test_the_one_statement_refuses_a_value_longer_than_its_column_as_a_bound_value_is(store, column):
    """PostgreSQL: an end's value longer than its VARCHAR column is refused ("value too long"), as the transaction's
    bound value is, never cut silently by the statement's cast."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("the one statement of ends: PostgreSQL")
    ending, _ = _one_statement_setup(store, 0)
    setattr(ending, column, "srv/1" + "x" * 600)
    with pytest.raises(sa.exc.DBAPIError, match="too long"):
        store.save_progress_then([ProgressWrite(ending, [], [], final=True)], holder="srv", then=lambda conn: None)
    assert (store.get_task(ending.id).status, store.get_task(ending.id).worker) == (TaskStatus.RUNNING, "srv/1")


def test_progress_writes_upsert_stages_and_a_final_write_never_overwrites_a_final_task(store):
    task = queued(1)[0]
    store.create_task(task)
    assert store.claim(task.id, worker="w", started_at=time.time())
    assert not store.claim(task.id, worker="other", started_at=time.time())  # no longer QUEUED
    stage = Stage("Processing", 0, StageStatus.RUNNING, total_items=10, processed_items=3, started_at=time.time())
    task.current_stage = "Processing"
    sample = ProgressSample(at=time.time(), stage="Processing", processed=3, total=10, message="three")
    store.save_progress_many([ProgressWrite(task, [stage], [sample])])
    stage.processed_items = 10  # the same (task, order): updated in place, not a second row
    stage.status = StageStatus.COMPLETED
    task.status, task.completed_at = TaskStatus.COMPLETED, time.time()
    task.output = {"rows": [1, 2.5, None, "x"], "nested": {"ok": True}}
    store.save_progress_many([ProgressWrite(task, [stage], [], final=True)])
    late = Task(**{**task.__dict__, "status": TaskStatus.FAILED, "error_message": "late", "stages": []})
    store.save_progress_many([ProgressWrite(late, [], [], final=True)])  # already final: left alone
    got = store.get_task(task.id)
    assert got is not None and got.status is TaskStatus.COMPLETED and got.error_message is None
    assert got.output == {"rows": [1, 2.5, None, "x"], "nested": {"ok": True}}  # JSON round trip
    assert [(s.name, s.processed_items, s.status) for s in got.stages] == [("Processing", 10, StageStatus.COMPLETED)]
    assert got.completed_at == pytest.approx(task.completed_at, abs=1e-6)  # float timestamps keep sub-ms
    samples, total = store.history(task.id, limit=10)
    assert total == 1 and samples[0].message == "three"


def test_queue_reads_updates_with_returning_and_boolean_flags(store):
    tasks = queued(6, owner="alice")
    tasks[0].priority = 5
    store.create_tasks(tasks)
    window, cut = store.queue_window(per_owner=2, limit=10)
    assert [t.id for t in window] == [t.id for t in tasks[:3]] and cut == {(0, "alice"): 3}
    assert store.queued_ahead(tasks[3]) == 3
    assert store.claim(tasks[1].id, worker="w", started_at=time.time())
    updated = store.update_queued([t.id for t in tasks], priority=2)  # RETURNING: the claimed one is left out
    assert sorted(updated) == sorted(t.id for t in tasks if t.id != tasks[1].id)
    assert store.update_task(tasks[1].id, cancel_requested=True, only_if_status=[TaskStatus.RUNNING])
    assert store.cancel_requested_ids([t.id for t in tasks]) == {tasks[1].id}
    assert store.get_task(tasks[1].id).cancel_requested is True
    assert store.get_task(tasks[2].id).cancel_requested is False
    assert store.counts_by_status() == {"QUEUED": 5, "RUNNING": 1}


def test_batch_counts_and_items_follow_retries(store):
    tasks = queued(3, batch_id="b1")
    store.create_tasks(tasks)
    store.update_task(tasks[0].id, status=TaskStatus.FAILED, completed_at=time.time())
    store.create_task(
        Task(
            id="retry",
            type="demo",
            status=TaskStatus.QUEUED,
            batch_id="b1",
            retry_of=tasks[0].id,
            stages=[Stage("S", 0, total_items=4, processed_items=1)],
        )
    )
    counts, superseded = store.batch_counts("b1")
    assert counts == {"QUEUED": 3} and superseded == 1
    processed, total, created, ended = store.batch_items("b1")
    assert (processed, total, ended) == (1, 4, None) and created == pytest.approx(tasks[1].created_at)
    assert store.retries_of([tasks[0].id]) == {tasks[0].id: "retry"}


def test_a_viewer_sees_exactly_what_owner_visible_says_whatever_the_case(store):
    # Prefixes compared exactly on both: SQLite's LIKE would ignore case where PostgreSQL's does not.
    owners = [None, "alice", "key:abc", "key:mine", "KEY:shouty"]
    store.create_tasks([Task(id=f"t{i}", type="demo", status=TaskStatus.QUEUED, owner=o) for i, o in enumerate(owners)])
    seen, _ = store.list_tasks(TaskFilter(viewer="key:mine"), limit=10)
    assert sorted(t.owner or "" for t in seen) == ["", "KEY:shouty", "alice", "key:mine"]
    assert store.count_tasks(TaskFilter(viewer="key:mine")) == 4


def test_evaluation_items_with_the_partial_mismatch_index(store):
    evaluations = EvaluationStore(store.engine)
    task = queued(1)[0]
    store.create_task(task)
    evaluations.create(
        {
            "id": "e1",
            "task_id": task.id,
            "type": "accuracy",
            "owner": None,
            "dataset": "d.csv",
            "definition": {"scorer": {"kind": "column"}},
            "created_at": time.time(),
        }
    )
    rows = [
        (
            i,
            f"id{i}",
            "in",
            "yes" if i % 2 else "no",
            "yes" if i % 2 else "no",
            "yes",
            [True, False, None][i % 3],
            None,
            None,
        )
        for i in range(12)
    ]
    evaluations.add_items("e1", "s", rows)  # the driver's executemany with its own placeholders
    wrong, cursor = evaluations.items("e1", ItemFilter("s", only_mismatches=True), limit=3)
    assert [r["seq"] for r in wrong] == [1, 2, 4] and cursor is not None
    rest, _ = evaluations.items("e1", ItemFilter("s", only_mismatches=True), limit=10, cursor=cursor)
    assert [r["seq"] for r in rest] == [5, 7, 8, 10, 11]
    labelled, _ = evaluations.items("e1", ItemFilter("s", label="YES"), limit=20)
    assert [r["seq"] for r in labelled] == [1, 3, 5, 7, 9, 11] and labelled[0]["correct"] is False
    evaluations.set_results("e1", {"s": {"accuracy": 0.5}}, {"items": 12})
    assert evaluations.get("e1")["metrics"] == {"s": {"accuracy": 0.5}}
    assert evaluations.delete_items("e1", 5) == 5 and evaluations.count_items("e1", "s") == 7


def test_keys_and_the_audit_log(store):
    keys = KeyStore(store.engine)
    key, secret = keys.create("a client", "operator")
    assert keys.verify(secret).id == key.id
    keys.revoke(key.id)
    assert keys.list() == [] and len(keys.list(include_revoked=True)) == 1
    audit = AuditLog(store.engine)
    try:
        audit.record(LOCAL_ADMIN, "tool.run_demo_task", details={"n": 1})
        audit.record(LOCAL_ADMIN, "key.create", target=key.id)
        audit.flush()
        records, _ = audit.query(action="Tool.*", limit=10)  # the same on both: action names are lower-case
        assert [r["action"] for r in records] == ["tool.run_demo_task"] and records[0]["details"] == {"n": 1}
    finally:
        audit.close()


def test_a_statement_over_the_timeout_is_cancelled_by_postgresql(postgres_url):
    store = Store(postgres_url, statement_timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"), store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 4
    finally:
        store.close()


def test_a_postgresql_url_without_a_driver_uses_psycopg(postgres_url):
    store = Store(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        assert store.engine.dialect.driver == "psycopg" and store.ping()
    finally:
        store.close()


def test_a_stage_name_longer_than_its_column_is_cut_not_refused_by_postgresql(store):
    # Task code chooses stage names; PostgreSQL refuses a value longer than its VARCHAR where SQLite keeps it,
    # and a refused write would fail the batched progress of every task written with it.
    from plexus_mcp_jupyter.core.models import STAGE_NAME_MAX
    from plexus_mcp_jupyter.core.progress import ProgressTracker

    task = queued(1)[0]
    store.create_task(task)
    store.claim(task.id, worker="w", started_at=time.time())
    change = ProgressTracker(task).begin_stage("Loading " + "x" * 500, 10, at=time.time())
    store.save_progress_many([ProgressWrite(task, change.changed_stages, [change.sample] if change.sample else [])])
    got = store.get_task(task.id)
    assert len(got.current_stage) == STAGE_NAME_MAX and got.current_stage.endswith("...")
    assert got.stages[0].name == got.current_stage


def test_a_score_name_longer_than_its_column_is_refused_by_name():
    from plexus_mcp_jupyter.core.errors import InvalidArgument
    from plexus_mcp_jupyter.evaluations.scorecards import load_scorecard

    from .test_scorecards import CARD

    with pytest.raises(InvalidArgument, match=r"scores\[0\]\.name': must be at most 128 characters, not 200"):
        load_scorecard(CARD.replace("name: stored predictions", "name: " + "s" * 200, 1))


def test_a_final_write_carries_its_stages_and_samples_in_the_tasks_row_and_every_read_merges_them(store):
    """A final write's stages and samples go in the task's own row (tasks.trail), not in task_stages and
    progress_samples; get_task, tasks_by_ids, list_tasks, tasks_with_status, history and batch_items read them as
    if they were rows: a stage of the trail replaces the row of its order, its samples follow the table's."""
    small, long_ = queued(2, batch_id="b")
    store.create_tasks([small, long_])
    store.claim_many([small.id, long_.id], worker="srv/pid=1", started_at=time.time())
    at = time.time()
    # The long task wrote two stages and a sample before its end; the small one nothing.
    first = Stage("Load", 0, StageStatus.COMPLETED, "ok", 4, 4, at, at + 1, None)
    second = Stage("Work", 1, StageStatus.RUNNING, None, 10, 3, at + 1, None, at + 9)
    long_.worker = small.worker = "srv/pid=1"
    store.save_progress_many([ProgressWrite(long_, [first, second], [ProgressSample(at + 1, "Work", 3, 10)])])
    done = Stage("Work", 1, StageStatus.COMPLETED, "all", 10, 10, at + 1, at + 2, None)
    only = Stage("Working", 0, StageStatus.COMPLETED, None, 1, 1, at, at + 0.5, None)
    for task in (small, long_):
        task.status, task.completed_at = TaskStatus.COMPLETED, at + 2
    store.save_progress_many(
        [
            ProgressWrite(
                small, [only], [ProgressSample(at, "Working", 0, 1), ProgressSample(at + 0.5, "Working", 1, 1)], True
            ),
            ProgressWrite(long_, [done], [ProgressSample(at + 2, "Work", 10, 10, "all")], True),
        ],
        holder="srv",
    )
    with store.engine.connect() as conn:  # the small task left no child rows, the long one its earlier ones
        assert conn.exec_driver_sql("SELECT task_id, stage_order, status FROM task_stages ORDER BY 2").all() == [
            (long_.id, 0, "COMPLETED"),
            (long_.id, 1, "RUNNING"),
        ]
        assert conn.exec_driver_sql("SELECT count(*) FROM progress_samples").scalar_one() == 1
    want = {small.id: [only], long_.id: [first, done]}
    assert {t.id: t.stages for t in store.tasks_by_ids([small.id, long_.id], stages=True)} == want
    assert {t.id: store.get_task(t.id).stages for t in (small, long_)} == want
    assert {t.id: t.stages for t in store.list_tasks(TaskFilter(), limit=10)[0]} == want
    assert {t.id: t.stages for t in store.tasks_with_status(TaskStatus.COMPLETED)} == want
    samples, total = store.history(long_.id, limit=10)
    assert total == 2 and [(s.processed, s.message) for s in samples] == [(3, None), (10, "all")]
    assert store.history(long_.id, limit=1) == ([ProgressSample(at + 2, "Work", 10, 10, "all")], 2)
    samples, total = store.history(small.id, limit=10)
    assert total == 2 and [s.processed for s in samples] == [0, 1]
    assert [s.processed for s in store.history(small.id, limit=3)[0]] == [0, 1]  # fewer than the limit: all
    assert [s.processed for s in store.history(small.id, limit=1)[0]] == [1]
    processed, items, _, ended = store.batch_items("b")
    assert (processed, items, ended) == (4 + 10 + 1, 4 + 10 + 1, pytest.approx(at + 2))
    # Re-queued: the trail goes as the rows do.
    assert store.requeue(small.id)
    assert store.get_task(small.id).stages == [] and store.history(small.id, limit=10) == ([], 0)


def test_no_trail_is_sql_null_and_a_json_null_from_an_older_store_counts_as_none(store, monkeypatch):
    """No trail is SQL NULL (tasks.trail is JSON with none_as_null): an insert, a final write that carried no
    stages or samples and a re-queue leave none, so batch_items sums those tasks' stage rows in SQL. A store the
    code before wrote holds JSON null there instead: every read takes it as no trail, batch_items included."""
    from plexus_mcp_jupyter.core import store as store_module

    plain, ended, requeued, trailed = queued(4, batch_id="b")
    plain.stages = [Stage("S", 0, total_items=5, processed_items=2)]
    store.create_tasks([plain, ended, requeued, trailed])
    at = time.time()
    store.claim_many([ended.id, requeued.id, trailed.id], worker="srv/pid=1", started_at=at)
    writes = []
    for task in (ended, requeued, trailed):
        task.worker, task.status, task.completed_at = "srv/pid=1", TaskStatus.COMPLETED, at + 1
        stages = [Stage("W", 0, StageStatus.COMPLETED, None, 3, 3, at, at + 1, None)] if task is trailed else []
        writes.append(ProgressWrite(task, stages, [], True))
    store.save_progress_many(writes, holder="srv")
    assert store.requeue(requeued.id)

    def null_trails() -> int:
        with store.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM tasks WHERE trail IS NULL").scalar_one()

    assert null_trails() == 3  # all but the one whose final write carried a stage
    read: list[str] = []  # the tasks batch_items merged in Python (read as having a trail)
    real = store_module._stages_from_trail
    monkeypatch.setattr(
        store_module, "_stages_from_trail", lambda task_id, trail: read.append(task_id) or real(task_id, trail)
    )
    want = {plain.id: [plain.stages[0]], ended.id: [], requeued.id: [], trailed.id: [writes[2].stages[0]]}
    for old in (False, True):
        if old:  # as the code before none_as_null stored them
            with store.engine.begin() as conn:
                json_null = "CAST('null' AS JSON)" if store.engine.dialect.name == "postgresql" else "'null'"
                conn.exec_driver_sql(f"UPDATE tasks SET trail = {json_null} WHERE trail IS NULL")
            assert null_trails() == 0
        read.clear()
        assert store.batch_items("b")[:2] == (2 + 3, 5 + 3)
        assert read == [trailed.id]
        assert {t.id: t.stages for t in store.tasks_by_ids(list(want), stages=True)} == want
        assert {i: store.get_task(i).stages for i in want} == want
        assert {t.id: t.stages for t in store.list_tasks(TaskFilter(), limit=10)[0]} == want
        assert store.history(ended.id, limit=5) == ([], 0)


def test_a_json_none_is_stored_as_sql_null_and_read_back_as_none(store):
    """A small task's JSON columns that hold nothing (its insert's output and error_details, a completed task's
    error_details) are SQL NULL, not the JSON text 'null' (a dump, a value to store and a load per column and
    task); every read gives None as before, and a JSON value stays JSON."""
    created = queued(2)
    created[1].output = {"kept": [1, None]}
    store.create_tasks(created)
    task = created[0]
    store.claim_many([task.id], worker="w/1", started_at=time.time())
    task.status, task.output, task.completed_at, task.worker = TaskStatus.COMPLETED, None, time.time(), "w/1"
    store.save_progress_many([ProgressWrite(task, [], [], final=True)])
    t = sa.table("tasks", sa.column("id"), sa.column("output"), sa.column("error_details"))
    with store.engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.select(t.c.id, sa.and_(t.c.output.is_(None), t.c.error_details.is_(None))).where(
                    t.c.id.in_([c.id for c in created])
                )
            ).all()
        )
    assert rows == {task.id: True, created[1].id: False}
    read = {t.id: t for t in store.tasks_by_ids([c.id for c in created])}
    assert read[task.id].output is None and read[task.id].error_details is None
    assert read[task.id].status is TaskStatus.COMPLETED
    assert read[created[1].id].output == {"kept": [1, None]}
