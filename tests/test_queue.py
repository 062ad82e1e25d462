"""The queue model (issue 12, items 1 and 2): priority then FIFO, owners sharing a priority, per-type caps,
resources with a reservation for the task at the head of the line, refusal of what can never fit, the
queue position shown by get_task, and a queue that survives the server being killed. A real Jupyter
server (and `plexus mcp serve --transport http`), the SDK client over real HTTP, real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import deque

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.store import Store, tasks_table
from plexus_mcp_jupyter.core.tasks import TaskType

from .conftest import open_client, poll, registered_task_types
from .test_standalone import plexus_env, start_http, stop

LONG = {"items": 100_000, "item_delay_ms": 50}  # runs until cancelled
SHORT = {"items": 1, "item_delay_ms": 0}


@pytest.fixture
def plexus_config(plexus_config):
    return {**plexus_config, "max_concurrency": 1, "key_slot_share": 1.0, "max_tasks_per_key": 100}


@pytest.fixture
def wide_type():
    """A task type whose tasks need two worker slots (the demo's code)."""
    from plexus_mcp_jupyter.core import demo

    with registered_task_types(
        TaskType(
            "wide",
            "plexus_mcp_jupyter.core.demo:run_demo",
            "two-slot demo",
            demo.validate_params,
            resources={"slots": 2},
        ),
        TaskType(
            "gpu_demo",
            "plexus_mcp_jupyter.core.demo:run_demo",
            "needs a GPU",
            demo.validate_params,
            resources={"slots": 1, "gpu": 1},
        ),
    ):
        yield "wide"


async def run(client, params: dict, priority: int = 0) -> str:
    started = await client.call_tool("run_demo_task", {**params, "priority": priority})
    assert not started.is_error, started.content[0].text
    return started.structured_content["task_id"]


async def detail(client, task_id: str) -> dict:
    got = await client.call_tool("get_task", {"task_id": task_id})
    assert not got.is_error, got.content[0].text
    return got.structured_content


async def status(client, task_id: str) -> str:
    return (await detail(client, task_id))["status"]


def started_order(manager, ids: list[str]) -> list[str]:
    tasks = [manager.get(task_id) for task_id in ids]
    assert all(t.started_at is not None for t in tasks), [t.status for t in tasks]
    return [t.id for t in sorted(tasks, key=lambda t: t.started_at)]


async def test_higher_priority_first_then_fifo_on_a_single_slot(mcp_url, token, runtime):
    async with open_client(mcp_url, token) as client:
        blocker = await run(client, LONG)
        await poll(lambda: status(client, blocker), lambda s: s == "RUNNING")
        low1, high1, low2, high2 = [await run(client, SHORT, p) for p in (0, 5, 0, 5)]
        expected = [high1, high2, low1, low2]
        places = [(await detail(client, t))["queue"] for t in expected]
        assert [p["position"] for p in places] == [1, 2, 3, 4]
        assert {p["reason"] for p in places} == {"no_slot"} and all(p["exact"] for p in places)
        assert "1 of 1 in use" in places[0]["message"]
        text = (await client.call_tool("get_task", {"task_id": low2})).content[0].text
        assert "Queue position 4" in text
        await client.call_tool("cancel_tasks", {"task_ids": [blocker]})
        await runtime.manager.wait_final(expected, 30)
        assert started_order(runtime.manager, expected) == expected
        assert (await detail(client, low2))["queue"] is None  # only queued tasks have a place


async def flood_and_share(flooder, other) -> None:
    """Key A floods first, then key B sends one task: B's starts after the one of A's running, not after
    all of A's queued ones (plain FIFO would make B wait for the whole flood)."""
    task = {"items": 30, "item_delay_ms": 100}  # about 3 s each
    flood = [await run(flooder, task) for _ in range(5)]
    await poll(lambda: status(flooder, flood[0]), lambda s: s == "RUNNING")
    mine = await run(other, task)
    place = (await detail(other, mine))["queue"]
    assert place["position"] == 1, place  # ahead of the flood's four queued tasks
    assert [(await detail(flooder, t))["queue"]["position"] for t in flood[1:]] == [2, 3, 4, 5]
    await poll(lambda: status(other, mine), lambda s: s != "QUEUED", timeout=15)
    started_before = [t for t in flood if (await detail(flooder, t))["started_at"] is not None]
    assert len(started_before) == 1, "key B waited for more than the one task of A that was running"
    await flooder.call_tool("cancel_tasks", {"status": ["QUEUED", "RUNNING"]})
    await other.call_tool("cancel_tasks", {"task_ids": [mine]})


async def test_two_keys_flooding_the_queue_share_it(mcp_url, runtime):
    _, a = runtime.keys.create("a", "operator", rate_limit=1000)
    _, b = runtime.keys.create("b", "operator", rate_limit=1000)
    async with open_client(mcp_url, a) as flooder, open_client(mcp_url, b) as other:
        await flood_and_share(flooder, other)


async def test_the_standalone_server_shares_the_queue_too(tmp_path):
    env = plexus_env(tmp_path)
    a, b = (
        json.loads(
            subprocess.run(
                [sys.executable, "-m", "plexus_mcp_jupyter.cli", "keys", "create", name, "--role", "operator"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["secret"]
        for name in ("a", "b")
    )
    proc, url, _ = start_http(tmp_path, "--max-concurrency", "1", PLEXUS_MCP_KEY_SLOT_SHARE="1")
    try:
        async with open_client(url, a) as flooder, open_client(url, b) as other:
            await flood_and_share(flooder, other)
    finally:
        stop(proc)


async def test_weighted_sharing_and_fifo_are_settings(runtime):
    # The same queue in the three modes (the plan is a pure function: no worker needed).
    from plexus_mcp_jupyter.core.models import Task, TaskStatus
    from plexus_mcp_jupyter.core.queue import QueuePolicy, start_order

    def task(n: int, owner: str, role: str) -> Task:
        return Task(
            id=f"{owner}-{n}",
            type="demo",
            status=TaskStatus.QUEUED,
            owner=owner,
            owner_role=role,
            created_at=1000.0 + n,
        )

    queued = sorted(
        [*(task(i, "key:op", "operator") for i in range(4)), *(task(10 + i, "jupyter", "admin") for i in range(4))],
        key=lambda t: t.created_at,
    )

    def order(fairness: str) -> list[str]:
        policy = QueuePolicy(
            capacity={"slots": 1},
            needs=lambda _: {"slots": 1},
            slot_cap=lambda _: 0,
            fairness=fairness,
            weights={"admin": 2.0, "operator": 1.0},
        )
        return [t.id for t in start_order(queued, policy)]

    assert order("fifo") == [t.id for t in queued]
    assert order("round_robin")[:4] == ["key:op-0", "jupyter-10", "key:op-1", "jupyter-11"]
    weighted = order("weighted")
    assert weighted[:3].count("key:op-0") == 1 and sum(t.startswith("jupyter") for t in weighted[:6]) == 4


async def test_a_two_slot_task_is_not_jumped_by_smaller_lower_priority_ones(mcp_url, token, runtime, wide_type):
    manager = runtime.manager
    manager.max_concurrency = 2
    async with open_client(mcp_url, token) as client:
        first = await run(client, {"items": 40, "item_delay_ms": 100})  # holds one of the two slots ~4 s
        await poll(lambda: status(client, first), lambda s: s == "RUNNING")
        wide = manager.dispatch(wide_type, SHORT, priority=5).id
        small = [await run(client, {"items": 3, "item_delay_ms": 50}) for _ in range(3)]
        place = (await detail(client, wide))["queue"]
        assert place["reason"] == "no_slot" and "it needs 2" in place["message"], place
        held = (await detail(client, small[0]))["queue"]
        assert held["reason"] == "no_slot" and wide in held["message"], held  # the free slot is held for it
        await manager.wait_final([first, wide, *small], 30)
        assert manager.get(wide).status.value == "COMPLETED"
        # The wide task started before any of the smaller, later, lower-priority ones.
        assert started_order(manager, [wide, *small])[0] == wide
        assert manager.get(wide).started_at >= manager.get(first).completed_at


async def test_a_task_bigger_than_the_whole_capacity_is_refused_with_both_numbers(jp_fetch, runtime, wide_type):
    runtime.manager.max_concurrency = 1
    for task_type, words in (
        ("wide", "slots: needs 2, the executor has 1 in all"),
        ("gpu_demo", "gpu: needs 1, the executor has 0 in all"),
    ):
        with pytest.raises(Exception) as refused:
            await jp_fetch(
                "plexus", "api", "tasks", method="POST", body=json.dumps({"type": task_type, "params": SHORT})
            )
        assert refused.value.code == 400
        assert words in refused.value.response.body.decode()
    runtime.manager.configure_queue(resources={"gpu": 1})
    accepted = await jp_fetch(
        "plexus", "api", "tasks", method="POST", body=json.dumps({"type": "gpu_demo", "params": SHORT})
    )
    assert accepted.code == 201
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter(type_names="wide")) == 0


async def test_a_type_cap_and_an_owner_cap_are_reasons_to_wait(mcp_url, token, runtime):
    manager = runtime.manager
    manager.max_concurrency = 3
    manager.configure_queue(type_caps={"demo": 1})
    async with open_client(mcp_url, token) as client:
        first = await run(client, SHORT)
        await manager.wait_final([first], 20)  # a finished demo: its run time feeds the estimates
        blocker = await run(client, LONG)
        await poll(lambda: status(client, blocker), lambda s: s == "RUNNING")
        waiting = await run(client, SHORT)
        place = (await detail(client, waiting))["queue"]
        assert place["reason"] == "type_cap" and "max_concurrency_by_type" in place["message"], place
        manager.configure_queue()
        manager.max_concurrency_per_owner = 1
        manager._schedule()
        place = (await detail(client, waiting))["queue"]
        assert place["reason"] == "owner_cap", place
        assert place["estimated_start_at"] is not None  # from the run time of the demo that finished
        await client.call_tool("cancel_tasks", {"task_ids": [blocker]})
        await manager.wait_final([waiting], 20)
        manager.max_concurrency_per_owner = 0


async def test_estimated_start_comes_from_recent_run_times(runtime):
    manager = runtime.manager
    manager.max_concurrency = 0  # paused: everything waits
    ids = [manager.dispatch("demo", SHORT).id for _ in range(3)]
    infos = [await manager.queue_info(manager.get(t)) for t in ids]
    assert all(info.estimated_start_at is None for info in infos)  # no slot, no history
    manager.max_concurrency = 1
    manager._durations["demo"] = deque([2.0, 4.0])
    running = manager.dispatch("demo", LONG, priority=9)
    manager._schedule()
    assert manager.get(running.id).status.value == "RUNNING"
    at = time.time()
    starts = [(await manager.queue_info(manager.get(t))).estimated_start_at for t in ids]
    assert starts[0] == pytest.approx(manager.get(running.id).started_at + 3.0, abs=0.5)
    assert starts[1] - starts[0] == pytest.approx(3.0) and starts[2] - starts[1] == pytest.approx(3.0)
    assert all(s >= at for s in starts)
    manager.cancel([running.id, *ids])


async def test_a_server_killed_with_a_full_queue_keeps_it_in_order(tmp_path):
    env = {"PLEXUS_MCP_MAX_CONCURRENCY": "1", "PLEXUS_MCP_POLL_INTERVAL": "0.2"}
    proc, url, token = start_http(tmp_path, **env)
    try:
        async with open_client(url, token) as client:
            running = await run(client, LONG)
            await poll(lambda: status(client, running), lambda s: s == "RUNNING")
            queued = [await run(client, LONG, p) for p in (0, 3, 0, 3, 1, 0)]
            before = {t: (await detail(client, t))["queue"]["position"] for t in queued}
        order = sorted(queued, key=before.__getitem__)
        assert [before[t] for t in order] == [1, 2, 3, 4, 5, 6]
    finally:
        proc.kill()  # SIGKILL: no shutdown, nothing cleaned up
        proc.wait(10)
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    with store.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(tasks_table.c.id, tasks_table.c.status)).all())
    assert rows[running] == "RUNNING" and {rows[t] for t in queued} == {"QUEUED"}  # as the kill left them
    store.close()
    proc, url, token = start_http(tmp_path, **env)
    try:
        async with open_client(url, token) as client:
            assert (await detail(client, running))["status"] == "FAILED"  # its server is gone: not RUNNING forever
            await poll(lambda: status(client, order[0]), lambda s: s == "RUNNING")
            after = {t: await detail(client, t) for t in order[1:]}
            assert all(d["status"] == "QUEUED" for d in after.values())
            assert [after[t]["queue"]["position"] for t in order[1:]] == [1, 2, 3, 4, 5]
            await client.call_tool("cancel_tasks", {"status": ["QUEUED", "RUNNING"]})
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("executor_resources", "slots=four", "executor_resources: slots must be a whole number >= 0, not 'four'"),
        ("executor_resources", "gpu", "executor_resources: 'gpu' is not name=value"),
        ("max_concurrency_by_type", "Demo=1", "the name 'Demo' must be lower-case"),
        ("queue_role_weights", "admin=0", "queue_role_weights: admin='0' must be a number > 0"),
        ("task_retention_by_type", "demo=soon", "task_retention_by_type: demo='soon' must be a number > 0"),
    ],
)
def test_a_bad_queue_or_retention_setting_is_refused_with_its_name(tmp_path, setting, value, words):
    from plexus_mcp_jupyter.config import PlexusSettings
    from plexus_mcp_jupyter.core.errors import InvalidArgument
    from plexus_mcp_jupyter.runtime import PlexusRuntime

    settings = PlexusSettings(db_url=f"sqlite:///{tmp_path / 'bad.db'}")
    setattr(settings, setting, value)
    with pytest.raises(InvalidArgument) as refused:
        PlexusRuntime(settings, data_dir=str(tmp_path))
    assert words in str(refused.value)


def test_listing_by_status_and_reading_the_queue_walk_indexes_without_sorting(tmp_path):
    # What keeps list_tasks at 0.5 ms and the scheduler's read at 0.9 ms with 100,000 stored tasks
    # (benchmarks/bench_list_tasks.py): each read walks an index in order, and nothing sorts the table.
    from plexus_mcp_jupyter.core.store import _QUEUE_GROUP_HEAD, _QUEUE_GROUPS, _list_query

    store = Store(f"sqlite:///{tmp_path / 'plan.db'}")

    def plan_of(query, params) -> str:
        compiled = query.compile(store.engine)
        with store.engine.connect() as conn:
            values = compiled.construct_params(params)
            rows = conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {compiled}", tuple(values[name] for name in compiled.positiontup)
            ).all()
        return " | ".join(str(r[-1]) for r in rows)

    one = plan_of(_list_query(1, 0, False, False, False), {"status_0": "COMPLETED", "limit": 21})
    two = plan_of(
        _list_query(2, 0, False, False, True),
        {"status_0": "FAILED", "status_1": "CANCELLED", "limit": 21, "after_created": 1.0, "after_id": "x"},
    )
    assert "ix_tasks_status_created" in one and "TEMP B-TREE" not in one, one
    assert two.count("ix_tasks_status_created") == 2, two  # one ordered walk per status, merged
    groups = plan_of(_QUEUE_GROUPS, {"limit": 200})
    head = plan_of(_QUEUE_GROUP_HEAD[True], {"priority": 0, "owner": "jupyter", "per_owner": 3})
    assert "COVERING INDEX ix_tasks_owner_queue" in groups, groups
    assert "ix_tasks_owner_queue" in head and "TEMP B-TREE" not in head, head
    store.close()


async def test_positions_past_the_look_ahead_count_what_was_not_read(runtime, monkeypatch):
    from plexus_mcp_jupyter.core import manager as manager_module

    monkeypatch.setattr(manager_module, "QUEUE_LOOKAHEAD", 4)
    manager = runtime.manager
    manager.max_concurrency = 0  # paused: the queue only grows
    a = [manager.dispatch("demo", SHORT, owner="key:a").id for _ in range(6)]
    b = manager.dispatch("demo", SHORT, owner="key:b").id
    low = manager.dispatch("demo", SHORT, owner="key:c", priority=-1).id

    async def place(task_id: str) -> tuple[int, bool]:
        info = await manager.queue_info(manager.get(task_id))
        return info.position, info.exact

    assert await place(a[0]) == (1, True)
    assert (await place(b))[0] == 2  # the owners share priority 0: b is second however long a's queue is
    assert await place(low) == (8, False)  # after all seven of priority 0
    assert await place(a[5]) == (6, False)  # not read: by priority and age alone
    manager.cancel([*a, b, low])
