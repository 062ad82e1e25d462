"""Retention (issue 12, item 5): finished tasks expire after their type's (or their MCP ttl's) retention,
are pruned with their stages and history by a background thread in bounded batches, and their ids answer
"expired" rather than "not found". A real Jupyter server, the SDK client over real HTTP, real workers."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolRequest, CallToolRequestParams, TaskMetadata

from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.retention import RetentionPolicy, RetentionPruner
from plexus_mcp_jupyter.core.store import Store, expired_table, samples_table, stages_table, tasks_table

from .conftest import MODERN, open_client, poll
from .test_mcp_tasks import get_task, raw_request

SHORT = {"items": 2, "item_delay_ms": 0}


@pytest.fixture
def plexus_config(plexus_config):
    return {
        **plexus_config,
        "task_retention_by_type": "demo=1",
        "retention_interval_seconds": 0.2,
        "max_task_ttl_seconds": 3600,
    }


def rows_of(store: Store, task_id: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            table.name: conn.execute(
                sa.select(sa.func.count())
                .select_from(table)
                .where((table.c.id if table.name in ("tasks", "expired_tasks") else table.c.task_id) == task_id)
            ).scalar_one()
            for table in (tasks_table, stages_table, samples_table, expired_table)
        }


async def test_a_finished_task_is_pruned_after_its_retention_and_answers_expired(mcp_url, token, jp_fetch, runtime):
    async with open_client(mcp_url, token) as client:
        started = await client.call_tool("run_demo_task", SHORT)
        task_id = started.structured_content["task_id"]
        await runtime.manager.wait_final([task_id], 20)
        done = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
        assert done["status"] == "COMPLETED" and done["retention_seconds"] == 1.0 and done["expires_at"]
        assert len(runtime.store.get_task(task_id).stages) == 3  # stored (rows, or its final write's trail)

        async def answer() -> str:
            return (await client.call_tool("get_task", {"task_id": task_id})).content[0].text

        text = await poll(answer, lambda t: "expired" in t, timeout=15)
        assert f"task {task_id!r} expired on 20" in text and "finished demo tasks are kept 1 second " in text, text
        cancelled = (await client.call_tool("cancel_tasks", {"task_ids": [task_id]})).structured_content
        assert cancelled["results"][0]["outcome"] == "not_found" and "expired on" in cancelled["results"][0]["message"]
        with pytest.raises(MCPError) as resource:
            await client.read_resource(f"plexus://tasks/{task_id}")
        assert "expired on" in str(resource.value)
        never = (await client.call_tool("get_task", {"task_id": "no-such-task"})).content[0].text
        assert "no task with id" in never  # an id that never existed is still "not found"
    assert rows_of(runtime.store, task_id) == {"tasks": 0, "task_stages": 0, "progress_samples": 0, "expired_tasks": 1}
    with pytest.raises(Exception) as gone:
        await jp_fetch("plexus", "api", "tasks", task_id)
    assert gone.value.code == 410 and "expired on" in json.loads(gone.value.response.body)["error"]["message"]


async def test_another_keys_expired_task_stays_not_found(mcp_url, token, runtime, keys):
    task = runtime.manager.dispatch("demo", SHORT, owner="key:someone-else")
    await runtime.manager.wait_final([task.id], 20)
    await poll(lambda: runtime.store.tombstone(task.id), lambda t: t is not None, timeout=15)
    async with open_client(mcp_url, keys["operator"]) as operator:
        text = (await operator.call_tool("get_task", {"task_id": task.id})).content[0].text
    assert "no task with id" in text and "expired" not in text


async def test_the_mcp_task_ttl_is_honoured_within_bounds_and_reported(mcp_url, token, runtime):
    runtime.manager.configure_retention(RetentionPolicy(default_seconds=3600, max_ttl_seconds=3600), interval=0.2)
    async with open_client(mcp_url, token) as client:

        async def task_call(ttl: int) -> dict:
            request = CallToolRequest(
                params=CallToolRequestParams(name="run_demo_task", arguments=SHORT, task=TaskMetadata(ttl=ttl))
            )
            params = request.model_dump(by_alias=True, mode="json")["params"]
            return (await raw_request(client, "tools/call", params))["task"]

        short, long = await task_call(1500), await task_call(10**12)
        assert short["ttl"] == 1500 and long["ttl"] == 3_600_000  # asked, and cut to max_task_ttl_seconds
        await runtime.manager.wait_final([short["taskId"], long["taskId"]], 20)

        with pytest.raises(MCPError) as expired:
            await poll(lambda: get_task(client.session, short["taskId"]), lambda _: False, timeout=15)
        assert "expired on" in str(expired.value)
        assert runtime.manager.get(long["taskId"]).status is TaskStatus.COMPLETED  # kept: its ttl is an hour
    async with open_client(mcp_url, token, MODERN) as modern:
        task = runtime.manager.dispatch("demo", SHORT)
        listed = await modern.call_tool("get_task", {"task_id": task.id})
        assert listed.structured_content["retention_seconds"] == 3600


def test_pruning_runs_in_bounded_batches_on_its_own_thread(store_url):
    store = Store(store_url)
    old = time.time() - 100
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(tasks_table),
            [
                {
                    "id": f"t{i}",
                    "type": "demo",
                    "status": "COMPLETED",
                    "priority": 0,
                    "created_at": old,
                    "completed_at": old + i * 1e-3,
                    "cancel_requested": False,
                }
                for i in range(1200)
            ],
        )
    keep = Task(id="recent", type="demo", status=TaskStatus.COMPLETED, completed_at=time.time())
    queued = Task(id="queued", type="demo", status=TaskStatus.QUEUED, created_at=old)
    store.create_task(keep)
    store.create_task(queued)
    calls: list[tuple[str, int]] = []

    def prune(policy, at, batch):
        removed = store.prune_expired(policy, at, batch)
        calls.append((threading.current_thread().name, len(removed)))
        return removed

    pruned: list[str] = []
    pruner = RetentionPruner(
        prune, RetentionPolicy(default_seconds=50), interval=0.05, batch=500, on_pruned=pruned.extend
    )
    pruner.start()
    deadline = time.monotonic() + 15
    while len(pruned) < 1200 and time.monotonic() < deadline:
        time.sleep(0.05)
    pruner.stop()
    assert sorted(pruned) == sorted(f"t{i}" for i in range(1200))
    assert [n for _, n in calls[:3]] == [500, 500, 200] and {name for name, _ in calls} == {"plexus-retention"}
    assert store.get_task("recent") is not None and store.get_task("queued") is not None  # not expired / not final
    assert store.tombstone("t7")["type"] == "demo"
    # Tombstones go in their turn, once as long again has passed.
    assert store.prune_expired(RetentionPolicy(default_seconds=50), time.time() + 200, 5000) == ["recent"]
    assert store.tombstone("t7") is None
    store.close()


async def test_an_expired_evaluation_goes_with_its_items(mcp_url, token, runtime):
    from plexus_mcp_jupyter.evaluations.store import evaluations_table, items_table

    from .test_evaluations import create, finished

    async with open_client(mcp_url, token) as client:
        made = await create(
            client, type="accuracy", dataset="example:sentiment", label_column="label", prediction_column="prediction"
        )
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"
        files = runtime.evaluations.store.files  # items are Parquet files beside the store (item_files.py)
        assert files.count(made["evaluation_id"], "score") > 0
        runtime.manager.configure_retention(RetentionPolicy(by_type={"evaluation": 0.5}), interval=0.2)
        await poll(lambda: runtime.store.tombstone(made["task_id"]), lambda t: t is not None, timeout=15)
        with runtime.store.engine.connect() as conn:
            left = [
                conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (evaluations_table, items_table)
            ]
        assert left == [0, 0]
        await poll(lambda: files.directory(made["evaluation_id"]).exists(), lambda exists: not exists, timeout=15)
        text = (await client.call_tool("get_task", {"task_id": made["task_id"]})).content[0].text
        assert "expired on" in text and "finished evaluation tasks are kept 0.5 seconds" in text
        evaluation = await client.call_tool("get_evaluation", {"evaluation_id": made["evaluation_id"]})
        assert evaluation.is_error and f"evaluation {made['evaluation_id']!r} expired on" in evaluation.content[0].text


def test_audit_records_older_than_their_retention_are_pruned_in_batches_by_the_writer(tmp_path):
    """The audit log stays bounded: after a write, the writer thread deletes what is older than
    audit_retention_days, a batch per transaction; newer records and the new one stay."""
    from plexus_mcp_jupyter.security.audit import AuditLog, audit_table

    store = Store(f"sqlite:///{tmp_path / 'audit.db'}")
    audit = AuditLog(store.engine)
    audit.configure_retention(10 * 86_400, batch=7)
    now = time.time()
    old = [{"at": now - 11 * 86_400 - i, "action": "tool.old", "outcome": "ok", "details": {}} for i in range(30)]
    recent = [{"at": now - 9 * 86_400, "action": "tool.recent", "outcome": "ok", "details": {}}]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(audit_table), old + recent)
    audit.record(None, "tool.new")
    audit.flush()

    def actions() -> list[str]:
        with store.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(audit_table.c.action)))

    deadline = time.monotonic() + 10
    while actions() != ["tool.new", "tool.recent"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert actions() == ["tool.new", "tool.recent"]
    assert audit.prune() == (0, False)  # nothing left to prune
    # A backlog is pruned a bounded number of batches at a time, and says more is left.
    with store.engine.begin() as conn:
        conn.execute(sa.insert(audit_table), old)
    assert audit.prune(max_batches=2) == (14, True)
    assert audit.prune(max_batches=10) == (16, False)
    audit.close()
    store.close()
