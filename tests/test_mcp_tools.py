"""The MCP tools over real HTTP with the official SDK client, in both protocol eras."""

from __future__ import annotations

import os
import time

import pytest

from .conftest import LEGACY, MODERN, poll
from .processes import pid_alive

ERAS = [pytest.param(LEGACY, id="2025-11-25"), pytest.param(MODERN, id="2026-07-28")]


async def wait_final(client, task_id: str, timeout: float = 30.0) -> dict:
    async def get():
        return (await client.call_tool("get_task", {"task_id": task_id, "history": True})).structured_content

    return await poll(get, lambda t: t["status"] in ("COMPLETED", "FAILED", "CANCELLED"), timeout=timeout)


@pytest.mark.parametrize("mode", ERAS)
async def test_the_catalogue_is_small_and_every_tool_has_schemas_with_descriptions(mcp_client, mode):
    async with mcp_client(mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == ALL_TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema and tool.output_schema["type"] == "object"
        for name, prop in tool.input_schema["properties"].items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
    items = tools["run_demo_task"].input_schema["properties"]["items"]
    assert items["minimum"] == 1 and items["maximum"] == 1_000_000
    status = tools["list_tasks"].input_schema
    assert "CANCELLED" in str(status)  # the allowed statuses are in the schema
    assert tools["get_task"].annotations.read_only_hint is True
    assert tools["cancel_tasks"].annotations.destructive_hint is True


ALL_TOOLS = {
    "run_demo_task",
    "list_tasks",
    "get_task",
    "cancel_tasks",
    "dispatch_batch",
    "retry_tasks",
    "set_task_priority",
    "create_evaluation",
    "get_evaluation",
    "get_evaluation_results",
    "list_evaluations",
    "list_datasets",
    "list_scorers",
}


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
@pytest.mark.parametrize("mode", ERAS)
async def test_a_demo_task_runs_to_completed_with_stages_counts_and_monotonic_history(mcp_client, mode):
    async with mcp_client(mode) as client:
        started = await client.call_tool("run_demo_task", {"items": 300, "item_delay_ms": 2})
        assert not started.is_error
        out = started.structured_content
        assert out["status"] == "QUEUED" and out["resource_uri"] == f"plexus://tasks/{out['task_id']}"
        assert out["task_id"] in started.content[0].text
        task = await wait_final(client, out["task_id"])
    assert task["status"] == "COMPLETED", task
    assert [(s["name"], s["status"], s["processed_items"], s["total_items"]) for s in task["stages"]] == [
        ("Setup", "COMPLETED", 3, 3),
        ("Processing", "COMPLETED", 300, 300),
        ("Finalizing", "COMPLETED", 2, 2),
    ]
    assert task["output"]["items_processed"] == 300
    assert task["progress"]["percent"] == 100.0
    history = task["history"]
    assert history and history[-1]["processed"] == 2
    for stage in ("Setup", "Processing", "Finalizing"):
        counts = [h["processed"] for h in history if h["stage"] == stage]
        assert counts == sorted(counts), f"{stage} history went backwards: {counts}"
    assert task["started_at"] >= task["created_at"] and task["completed_at"] >= task["started_at"]


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_fail_at_ends_failed_with_the_error_message_and_the_failing_stage(mcp_client):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 100, "item_delay_ms": 1, "fail_at": 40})
        task = await wait_final(client, started.structured_content["task_id"])
        summary = (await client.call_tool("get_task", {"task_id": task["task_id"]})).content[0].text
    assert task["status"] == "FAILED"
    assert task["error_message"] == "RuntimeError: Simulated failure at item 40 of 100"
    assert task["error_details"]["exception_type"] == "RuntimeError"
    processing = task["stages"][1]
    assert processing["status"] == "FAILED" and processing["processed_items"] == 39
    assert "FAILED" in summary and "Simulated failure" in summary


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_random_failure_is_between_30_and_70_percent_and_repeatable_with_a_seed(mcp_client):
    async with mcp_client() as client:
        ids = [
            (
                await client.call_tool("run_demo_task", {"items": 200, "item_delay_ms": 0, "fail": True, "seed": 7})
            ).structured_content["task_id"]
            for _ in range(2)
        ]
        tasks = [await wait_final(client, i) for i in ids]
    points = {t["error_message"] for t in tasks}
    assert len(points) == 1  # same seed, same failure point
    item = int(points.pop().split("item ")[1].split(" ")[0])
    assert 60 <= item <= 140


async def test_cancelling_a_running_task_ends_cancelled_within_the_grace_period_and_its_worker_is_gone(
    mcp_client, runtime
):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
        task_id = started.structured_content["task_id"]

        async def processing():
            return (await client.call_tool("get_task", {"task_id": task_id})).structured_content

        await poll(processing, lambda t: t["current_stage"] == "Processing" and t["progress"]["processed"] > 0)
        pid = runtime.executor.pid(task_id)
        assert pid is not None and pid_alive(pid)
        started_cancel = time.monotonic()
        cancelled = await client.call_tool("cancel_tasks", {"task_ids": [task_id], "wait_seconds": 5})
        elapsed = time.monotonic() - started_cancel
        assert elapsed < runtime.settings.cancel_grace_seconds + 1.0
        assert cancelled.structured_content["results"][0]["outcome"] == "cancelled", cancelled.structured_content
        task = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
        again = await client.call_tool("cancel_tasks", {"task_ids": [task_id]})
    assert task["status"] == "CANCELLED" and task["stages"][-1]["status"] == "CANCELLED"
    assert task["cancel_requested"] is True
    await poll(lambda: pid_alive(pid), lambda alive: not alive, timeout=5)
    result = again.structured_content["results"][0]
    assert result["outcome"] == "already_finished" and "nothing to cancel" in result["message"]


async def test_list_filters_and_pagination_visit_every_task_once(mcp_client, runtime):
    # Tasks queued behind a paused scheduler stay QUEUED: the filters see stable states.
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        ids = [
            (await client.call_tool("run_demo_task", {"items": 5, "priority": i % 3})).structured_content["task_id"]
            for i in range(25)
        ]
        runtime.manager.cancel(ids[:5])
        seen, cursor = [], None
        while True:
            args = {"limit": 7, "status": ["QUEUED"]}
            if cursor:
                args["cursor"] = cursor
            page = (await client.call_tool("list_tasks", args)).structured_content
            assert len(page["tasks"]) <= 7
            seen += [t["task_id"] for t in page["tasks"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        cancelled = await client.call_tool("list_tasks", {"status": ["CANCELLED"], "type": ["demo"]})
        since_future = await client.call_tool("list_tasks", {"since": "2999-01-01T00:00:00Z"})
    assert sorted(seen) == sorted(ids[5:]) and len(seen) == len(set(seen))
    assert seen == list(reversed(ids[5:]))  # newest first
    assert {t["task_id"] for t in cancelled.structured_content["tasks"]} == set(ids[:5])
    assert since_future.structured_content == {"tasks": [], "next_cursor": None}


BAD_CALLS = [
    ("get_task", {"task_id": "no-such-task"}, "no task with id 'no-such-task'"),
    (
        "run_demo_task",
        {"items": 0},
        "invalid arguments for run_demo_task: items: Input should be greater than or equal to 1 (got 0)",
    ),
    ("run_demo_task", {"items": 10**9}, "less than or equal to 1000000"),
    ("run_demo_task", {"items": "many"}, "valid integer"),
    ("run_demo_task", {"items": 10, "fail_at": 11}, "fail_at must be an item number from 1 to items (10)"),
    ("list_tasks", {"status": ["DONE"]}, "status[0]: unknown status; expected one of QUEUED, RUNNING"),
    ("list_tasks", {"type": ["mining"]}, "unknown task type 'mining'; expected one of demo"),
    ("list_tasks", {"cursor": "bogus"}, "invalid cursor"),
    ("list_tasks", {"since": "yesterday"}, "'since' must be an ISO 8601"),
    ("list_tasks", {"limit": 1000}, "less than or equal to 100"),
    ("cancel_tasks", {}, "either task_ids"),
    ("cancel_tasks", {"task_ids": ["a"], "status": ["QUEUED"]}, "not both"),
    ("nonexistent_tool", {}, "unknown tool 'nonexistent_tool'; available tools: cancel_tasks, create_evaluation"),
    ("get_task", {}, "invalid arguments for get_task: task_id is required: The task's id"),
    ("run_demo_task", {"items": 10, "item_delay": 5}, "unknown argument(s) item_delay; allowed: fail, fail_at"),
]


@pytest.mark.parametrize(
    ("tool", "args", "message"), BAD_CALLS, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(BAD_CALLS)]
)
async def test_bad_input_is_a_tool_error_saying_what_is_allowed_and_nothing_is_written(
    mcp_client, runtime, tool, args, message
):
    before = runtime.manager.counts()
    async with mcp_client() as client:
        result = await client.call_tool(tool, args)
        assert result.is_error, result
        assert message in result.content[0].text
        assert "Traceback" not in result.content[0].text
        assert "errors.pydantic.dev" not in result.content[0].text
        # the server keeps serving
        assert not (await client.call_tool("list_tasks", {})).is_error
    assert runtime.manager.counts() == before


async def test_a_cursor_from_another_filter_is_refused(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        for _ in range(3):
            await client.call_tool("run_demo_task", {"items": 5})
        page = (await client.call_tool("list_tasks", {"limit": 1})).structured_content
        other = await client.call_tool("list_tasks", {"limit": 1, "status": ["QUEUED"], "cursor": page["next_cursor"]})
    assert other.is_error and "other filters" in other.content[0].text


async def test_tasks_are_owned_by_the_jupyter_user_who_dispatched_them(mcp_client, jp_serverapp):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 1})
        task = await client.call_tool("get_task", {"task_id": started.structured_content["task_id"]})
    assert task.structured_content["owner"] == "jupyter"  # the notebook user, whatever the request
    assert os.path.exists(jp_serverapp.web_app.settings["plexus"].store.engine.url.database)


async def test_cancelling_by_filter_is_bounded_and_refused_whole_beyond_the_bound(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    runtime.manager.max_batch_size = 100
    for _ in range(105):
        runtime.manager.dispatch("demo", {"items": 1})
    async with mcp_client() as client:
        first = await client.call_tool("cancel_tasks", {"status": ["QUEUED"], "type": ["demo"]})
        runtime.manager.max_batch_size = 105
        second = await client.call_tool("cancel_tasks", {"status": ["QUEUED"]})
    assert first.is_error and "matches 105 tasks, more than the 100" in first.content[0].text
    assert len(second.structured_content["results"]) == 105 and second.structured_content["matched"] == 105
    assert {r["outcome"] for r in second.structured_content["results"]} == {"cancelled"}
