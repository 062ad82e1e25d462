"""Live updates over MCP: progress notifications, and client cancellation of the underlying task."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from .conftest import LEGACY, MODERN, poll
from .processes import pid_alive


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_progress_notifications_arrive_in_order_monotonic_and_end_at_total(mcp_client, mode):
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        updates.append((progress, total, message))

    async with mcp_client(mode) as client:
        result = await client.call_tool(
            "run_demo_task", {"items": 400, "item_delay_ms": 2}, progress_callback=on_progress
        )
        # The SDK's client runs each progress callback in a task of its own: the last may run after the answer.
        await poll(lambda: updates[-1][0] if updates else 0.0, lambda done: done >= 3 + 400 + 2 + 1, timeout=10)
    assert not result.is_error, result
    assert result.structured_content["status"] == "COMPLETED"
    assert len(updates) >= 5
    values = [p for p, _, _ in updates]
    assert values == sorted(values) and len(set(values)) == len(values), "progress must strictly increase"
    final_progress, final_total, final_message = updates[-1]
    assert final_progress == final_total == 3 + 400 + 2 + 1  # every item of every stage, and the end
    assert final_message.startswith("COMPLETED")
    assert any(m and m.startswith("Processing:") for _, _, m in updates)


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_a_failing_task_streams_to_a_clear_failure_result(mcp_client):
    async with mcp_client() as client:
        result = await client.call_tool(
            "run_demo_task",
            {"items": 100, "item_delay_ms": 1, "fail_at": 50},
            progress_callback=lambda *a: asyncio.sleep(0),
        )
    assert result.is_error
    assert "FAILED" in result.content[0].text and "Simulated failure at item 50" in result.content[0].text
    assert result.structured_content["status"] == "FAILED"


async def test_cancelling_the_call_cancels_the_task_and_stops_its_worker(mcp_client, runtime):
    manager = runtime.manager
    seen: list[float] = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with mcp_client() as client:
        async with anyio.create_task_group() as tg:

            async def call():
                await client.call_tool(
                    "run_demo_task", {"items": 100_000, "item_delay_ms": 5}, progress_callback=on_progress
                )

            tg.start_soon(call)
            await poll(lambda: len(seen), lambda n: n >= 3)
            running = [t for t in manager._running.values()]
            assert len(running) == 1
            task_id = running[0].task.id
            pid = manager.executor.pid(task_id)
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled for the request
        await manager.wait_final([task_id], 10)
        task = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
    assert task["status"] == "CANCELLED"
    await poll(lambda: pid_alive(pid), lambda alive: not alive, timeout=5)
