"""PostgreSQL's claim against a queued task changed by another connection at the worst moments, on a real
PostgreSQL (tests/postgres.py), the interleavings driven by locks, never by timing.

`Store.claim_planned`'s first statement probes the plan's order by id, locks each row still QUEUED (FOR UPDATE
SKIP LOCKED) and updates the rows picked by their address (ctid). A re-prioritisation or a cancel of a queued task
(`Store.update_queued`, another server's or this one's) may hold the row while the claim probes it (the claim
skips it), or commit after the claim's statement began and before it reaches the row (the claim then locks the
row's new version, which its snapshot does not see). Either way: no task claimed twice, a cancelled task never
started, a re-prioritised one claimed (by this pass when it could lock it, else by a later one), and a pass never
reports as gone a task it did not find taken."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.store import Store

HOLD = 4242  # the advisory lock a held claim waits for
# What set_task_priority and cancel_tasks write to a queued task (core/batches.py, through Store.update_queued).
CHANGES = {
    "priority": {"priority": 5},
    "cancel": {"status": TaskStatus.CANCELLED, "completed_at": 1.0, "cancel_requested": True},
}


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    s = Store(postgres_url)
    yield s
    s.close()


def queued(store: Store, n: int) -> list[str]:
    """`n` QUEUED tasks, oldest first; their ids."""
    base = time.time()
    tasks = [Task(id=uuid.uuid4().hex, type="demo", status=TaskStatus.QUEUED, created_at=base + i) for i in range(n)]
    store.create_tasks(tasks)
    return [task.id for task in tasks]


def claim_pass(store: Store, order: list[str], n: int, worker: str) -> tuple[list[str], set[str], set[str]]:
    """One scheduling pass that plans to start the first `n` of `order` not gone."""
    return store.claim_planned(
        lambda gone: [i for i in order if i not in gone][:n], worker=worker, started_at=time.time(), order=order
    )


def status_of(store: Store, task_id: str) -> tuple[TaskStatus, str | None, float | None]:
    task = store.get_task(task_id)
    assert task is not None
    return task.status, task.worker, task.started_at


@contextlib.contextmanager
def claim_held_at(store: Store, task_id: str) -> Iterator[None]:
    """Claims wait in their update of `task_id`'s row (a trigger waiting for an advisory lock held here) until the
    block ends: after their statement's snapshot, before they probe what follows `task_id` in their order."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION hold_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_advisory_lock({HOLD}); PERFORM pg_advisory_unlock({HOLD}); RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER hold_claim BEFORE UPDATE ON tasks FOR EACH ROW "
            f"WHEN (OLD.id = '{task_id}' AND NEW.status = 'RUNNING') EXECUTE FUNCTION hold_claim()"
        )
    with store.engine.connect() as holder:
        holder.exec_driver_sql(f"SELECT pg_advisory_lock({HOLD})")
        try:
            yield
        finally:
            holder.exec_driver_sql(f"SELECT pg_advisory_unlock({HOLD})")
            holder.commit()


def wait_for_lock(store: Store, locktype: str, waiting: concurrent.futures.Future) -> None:
    """Until a session waits for a lock of `locktype` (polled with a deadline): `waiting`, which must not end."""
    query = f"SELECT count(*) FROM pg_locks WHERE locktype = '{locktype}' AND NOT granted"
    deadline = time.monotonic() + 30
    with store.engine.connect() as conn:
        while not conn.exec_driver_sql(query).scalar_one():
            assert not waiting.done(), f"it did not wait for a {locktype} lock: {waiting.result()}"
            assert time.monotonic() < deadline, f"nothing waited for a {locktype} lock"
            conn.rollback()
            time.sleep(0.01)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_queued_task_changed_while_a_claim_probes_it_is_skipped_then_claimed_once_or_never(store, change):
    # The change holds the row (its transaction open) while the claim runs: SKIP LOCKED passes over it.
    a, r, c = queued(store, 3)
    values = CHANGES[change]
    with store.engine.connect() as other:
        other.execute(
            sa.text(
                f"UPDATE tasks SET {', '.join(f'{k} = :{k}' for k in values)} WHERE id = :id AND status = 'QUEUED'"
            ),
            {"id": r, **{k: getattr(v, "value", v) for k, v in values.items()}},
        )
        ids, won, gone = claim_pass(store, [a, r, c], 2, "first")
        assert (ids, won, gone) == ([a, c], {a, c}, {r})
        other.commit()
    later = claim_pass(store, [r], 1, "later")
    if change == "cancel":
        assert later == ([], set(), {r})
        assert status_of(store, r) == (TaskStatus.CANCELLED, None, None)  # never started
    else:
        assert later[1] == {r}
        assert status_of(store, r)[:2] == (TaskStatus.RUNNING, "later")  # claimed once, by the later pass


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_queued_task_changed_after_a_claim_began_is_claimed_by_it_or_never_started(store, change):
    # The change commits after the claim's statement took its snapshot and before the claim reaches the row (held
    # in its update of the order's first task): the claim locks the row's new version.
    a, r, c = queued(store, 3)
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        claim_held_at(store, a),
    ):
        claiming = pool.submit(claim_pass, store, [a, r, c], 2, "first")
        wait_for_lock(store, "advisory", claiming)
        assert store.update_queued([r], **CHANGES[change]) == [r]  # not locked yet: committed at once
    ids, won, gone = claiming.result(timeout=30)
    if change == "cancel":
        assert (ids, won, gone) == ([a, c], {a, c}, {r})
        assert status_of(store, r) == (TaskStatus.CANCELLED, None, None)  # never started
        assert claim_pass(store, [r], 1, "later") == ([], set(), {r})
    else:
        # Re-prioritised and still QUEUED when locked: this pass claims it, and reports nothing gone.
        assert (ids, won, gone) == ([a, r], {a, r}, set())
        assert status_of(store, r)[:2] == (TaskStatus.RUNNING, "first")
        assert claim_pass(store, [r], 1, "later") == ([], set(), {r})  # never twice


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_of_a_task_the_claim_holds_waits_and_then_leaves_it_running(store, change):
    # The claim locked the row first (held in its update of it): the change waits for the claim's commit, then
    # finds the task no longer QUEUED and leaves it alone (the manager cancels a running task its own way).
    a, r, c = queued(store, 3)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with claim_held_at(store, r):
            claiming = pool.submit(claim_pass, store, [a, r, c], 2, "first")
            wait_for_lock(store, "advisory", claiming)
            changing = pool.submit(store.update_queued, [r], **CHANGES[change])
            wait_for_lock(store, "transactionid", changing)  # waits for the claim's transaction
        assert claiming.result(timeout=30) == ([a, r], {a, r}, set())
        assert changing.result(timeout=30) == []
    assert status_of(store, r)[:2] == (TaskStatus.RUNNING, "first")
    assert claim_pass(store, [r], 1, "later") == ([], set(), {r})  # never twice


def test_a_claim_of_a_groups_head_takes_its_first_free_tasks_in_order_and_no_other_groups(store):
    """`Store.claim_group_head` (a pass of a server that knows the queue holds one group): the group's first queued
    tasks by age, a task another transaction is claiming skipped (never waited for), another group's tasks left,
    and what the plan refuses put back QUEUED."""
    other = [
        Task(id=uuid.uuid4().hex, type="demo", status=TaskStatus.QUEUED, owner="key:b", created_at=1.0 + i)
        for i in range(2)
    ]
    store.create_tasks(other)  # older, but of another group
    ids = queued(store, 6)

    def claim(n: int, accept=lambda tasks: True) -> list[str] | None:
        got = store.claim_group_head((0, None), n, accept, worker="me", started_at=time.time())
        return None if got is None else [task.id for task in got]

    with store.engine.connect() as holder:  # another server's claim of the first task, under way
        holder.exec_driver_sql("SELECT id FROM tasks WHERE id = %(id)s FOR UPDATE", {"id": ids[0]})
        assert claim(3) == ids[1:4]
        holder.rollback()
    assert claim(2, accept=lambda tasks: False) is None  # the plan refused them: back to the queue
    assert [status_of(store, i)[0] for i in (ids[0], ids[4])] == [TaskStatus.QUEUED] * 2
    assert claim(5) == [ids[0], ids[4], ids[5]]  # the group ran short
    assert claim(1) == []
    assert all(status_of(store, i)[:2] == (TaskStatus.RUNNING, "me") for i in ids)
    assert [status_of(store, task.id)[0] for task in other] == [TaskStatus.QUEUED] * 2
    got = store.claim_group_head((0, "key:b"), 1, lambda tasks: True, worker="me", started_at=time.time())
    assert got is not None and [(t.id, t.status, t.params) for t in got] == [(other[0].id, TaskStatus.QUEUED, {})]
