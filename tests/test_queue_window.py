"""The scheduler's kept window of the queue (core/queue.py QueueWindow) and the claim of one pass's starts in one
statement (Store.claim_many): what a view shows is what a fresh read would, and a claim never wins a task that
another claimed or cancelled meanwhile."""

from __future__ import annotations

import itertools
import random
import time
import uuid

import pytest

import plexus_mcp_jupyter.core.manager as manager_mod
from plexus_mcp_jupyter.core import queue as queue_mod
from plexus_mcp_jupyter.core.manager import _starts_of_head
from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.queue import FairClock, QueuePolicy, QueueWindow, plan
from plexus_mcp_jupyter.core.store import Store


def queued(n: int, owner: str | None = None, priority: int = 0, base: float | None = None) -> list[Task]:
    base = time.time() if base is None else base
    return [
        Task(
            id=uuid.uuid4().hex,
            type="demo",
            status=TaskStatus.QUEUED,
            owner=owner,
            priority=priority,
            created_at=base + i * 1e-3,
        )
        for i in range(n)
    ]


def read(store: Store, head: int, spare: int) -> QueueWindow:
    tasks, cut = store.queue_window(per_owner=head + spare, limit=200)
    return QueueWindow(0, tasks, cut)


def test_a_view_is_what_a_fresh_read_would_return_until_a_group_with_unread_tasks_runs_short(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        store.create_tasks(queued(40, owner="a") + queued(3, owner="b") + queued(2, owner="c", priority=5))
        window = read(store, head=3, spare=6)  # 9 of a's 40, all of b's and c's
        taken: list[Task] = []
        while (view := window.view(3)) is not None:
            fresh = store.queue_window(per_owner=3, limit=200)
            assert [t.id for t in view[0]] == [t.id for t in fresh[0]]
            assert view[1] == fresh[1]  # how many each group has beyond what is shown
            first = view[0][0]
            assert store.claim_many([first.id], worker="w", started_at=time.time()) == {first.id}
            window.taken({first.id})
            taken.append(first)
        # c's tasks went first (priority), then a's and b's by age, until 2 of the 9 of a's read were left: fewer
        # than a pass looks at while 31 more were never read, so the window asks for a new read
        assert [t.owner for t in taken[:2]] == ["c", "c"] and sum(t.owner == "a" for t in taken) == 7
        left = store.queue_window(per_owner=100, limit=200)[0]
        assert len(left) == 45 - len(taken) and "c" not in {t.owner for t in left}
    finally:
        store.close()


def test_a_window_of_a_whole_queue_serves_every_task(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        store.create_tasks(queued(5, owner="a"))
        window = read(store, head=2, spare=8)
        seen = []
        while (view := window.view(2)) is not None and view[0]:
            seen.append(view[0][0].id)
            window.taken({view[0][0].id})
        assert len(seen) == 5 and window.view(2) == ([], {})
    finally:
        store.close()


@pytest.mark.parametrize("taken", ["claimed", "cancelled"])
def test_a_claim_of_many_wins_only_the_tasks_still_queued(tmp_path, taken):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    other = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        tasks = queued(6)
        store.create_tasks(tasks)
        gone = {tasks[1].id, tasks[4].id}
        for task_id in gone:
            if taken == "claimed":  # by another server, through its own pool
                assert other.claim_many([task_id], worker="other", started_at=time.time()) == {task_id}
            else:
                assert other.update_queued([task_id], status=TaskStatus.CANCELLED.value) == [task_id]
        ids = [t.id for t in tasks]
        won = store.claim_many(ids, worker="me", started_at=time.time())
        assert won == set(ids) - gone
        assert store.claim_many(ids, worker="me", started_at=time.time()) == set()  # nothing left to win
        for task_id in ids:
            row = store.get_task(task_id)
            assert (row.worker == "me") == (task_id in won)
    finally:
        store.close()
        other.close()


@pytest.mark.parametrize("per_owner, limit", [(3, 200), (50, 200), (2, 5)])
def test_the_schedulers_read_finds_the_groups_by_seeks_and_returns_what_the_counting_read_does(
    tmp_path, per_owner, limit
):
    """queue_window(exact=False): the same tasks and the same groups with unread tasks as the counting read (its
    counts become 1, "at least one"), with owner-less groups, several priorities and a limit that cuts groups
    off; and its group seeks walk the queue index without scanning the table."""
    from plexus_mcp_jupyter.core.store import _QUEUE_NEXT_OWNER, _QUEUE_PRIORITY, _QUEUE_UNOWNED

    store = Store(f"sqlite:///{tmp_path}/seek.db")
    try:
        store.create_tasks(
            queued(40, owner="a")
            + queued(3, owner="b")
            + queued(5, owner=None)
            + queued(2, owner="c", priority=5)
            + queued(4, owner=None, priority=-3)
        )
        counted, cut = store.queue_window(per_owner=per_owner, limit=limit)
        sought, flags = store.queue_window(per_owner=per_owner, limit=limit, exact=False)
        assert [t.id for t in sought] == [t.id for t in counted]
        assert flags == {group: 1 for group in cut}
        assert bool(cut) == (per_owner < 40)  # owner "a" has 40 queued

        with store.engine.connect() as conn:
            for query, params in (
                (_QUEUE_PRIORITY[False], {}),
                (_QUEUE_PRIORITY[True], {"priority": 5}),
                (_QUEUE_UNOWNED, {"priority": 0}),
                (_QUEUE_NEXT_OWNER[False], {"priority": 0}),
                (_QUEUE_NEXT_OWNER[True], {"priority": 0, "owner": "a"}),
            ):
                compiled = query.compile(store.engine)
                values = compiled.construct_params(params)
                plan = " | ".join(
                    str(row[-1])
                    for row in conn.exec_driver_sql(
                        f"EXPLAIN QUERY PLAN {compiled}", tuple(values[name] for name in compiled.positiontup)
                    )
                )
                assert "ix_tasks_owner_queue" in plan and "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    finally:
        store.close()


@pytest.mark.parametrize("mixed", [False, True])
def test_a_one_group_pass_plans_a_prefix_of_the_head_and_starts_what_the_whole_head_would(mixed):
    """`_starts_of_head` (a one-group pass, every pass): tasks of one type are planned on the first free slots + 1
    of the head, and the count is what a plan of the whole head starts, whatever the caps, resources and running
    tasks; a head of several types is planned whole."""
    rng = random.Random(13)
    planned: list[int] = []
    real_plan = queue_mod.plan

    def counting(tasks, *args, **kwargs):
        planned.append(len(tasks))
        return real_plan(tasks, *args, **kwargs)

    for slots, n_running, head_len, owner_cap, type_cap, memory in itertools.product(
        (1, 4), (0, 1, 3, 5), (1, 3, 5, 38), (0, 2), (0, 3), (0, 300, 600)
    ):
        needs = {"demo": {"slots": 1, "memory_mb": memory}, "other": {"slots": 2}}
        policy = QueuePolicy(
            capacity={"slots": slots, "memory_mb": 1000},
            needs=needs.__getitem__,
            slot_cap=lambda owner, cap=owner_cap: cap,
            type_caps={"demo": type_cap} if type_cap else {},
        )
        head = queued(head_len, owner="a")
        if mixed:
            for task in rng.sample(head, k=max(1, head_len // 3)):
                task.type = "other"
        running = queued(n_running, owner=rng.choice(["a", "b"]))
        whole = len(plan(head, running, policy, clock=FairClock(), reasons=False).starts)
        planned.clear()
        manager_mod.queue_plan, saved = counting, manager_mod.queue_plan
        try:
            assert _starts_of_head(head, running, policy, FairClock()) == whole
        finally:
            manager_mod.queue_plan = saved
        if not mixed and slots - n_running + 1 < head_len and whole < slots - n_running + 1:
            assert planned == [max(slots - n_running, 0) + 1], "tasks of one type: the prefix alone"
