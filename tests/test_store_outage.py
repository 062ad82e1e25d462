"""A real Jupyter server on a real PostgreSQL that stops and comes back: health turns degraded and says why, REST
answers 503 with Retry-After and MCP a clear tool error (never a traceback or a stalled loop), and all recover
when the database returns. The cluster is this module's own (tests/postgres.py), so stopping it disturbs no
other test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from .conftest import poll
from .postgres import PostgresCluster, cluster_for_tests

PROMPT = 3.0  # seconds within which the loop answers a request that needs no store (generous: a shared machine)


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    with cluster_for_tests() as cluster:
        yield cluster


@pytest.fixture
def plexus_config(own_cluster) -> dict[str, Any]:
    url = own_cluster.create_database()
    return {
        "db_url": url,
        "cancel_grace_seconds": 1.0,
        "poll_interval": 0.2,
        "progress_write_interval": 0.2,
        "db_pool_timeout_seconds": 3.0,
    }


async def test_a_stopped_database_gives_503_and_degraded_health_then_recovers(
    server_url, token, runtime, mcp_client, own_cluster
):
    headers = {"Authorization": f"token {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        health = (await http.get(server_url + "plexus/api/health")).json()
        assert health["status"] == "ok" and health["tasks"] is not None
        assert (await http.get(server_url + "plexus/api/tasks")).status_code == 200
        own_cluster.stop()
        try:
            health = (await http.get(server_url + "plexus/api/health")).json()
            assert health["status"] == "degraded", health
            assert health["store"]["status"].startswith("the store is unavailable"), health
            assert health["tasks"] is None
            listing = await http.get(server_url + "plexus/api/tasks")
            assert listing.status_code == 503, listing.text
            assert listing.headers["Retry-After"] == "5"
            message = listing.json()["error"]["message"]
            assert message.startswith("the store is unavailable") and "Traceback" not in message
            async with mcp_client() as client:
                listed = await client.call_tool("list_tasks", {})
                assert listed.is_error and "the store is unavailable" in listed.content[0].text
        finally:
            own_cluster.start()  # the same port: the server's pool reconnects by itself

        async def health_status() -> str:
            return (await http.get(server_url + "plexus/api/health")).json()["status"]

        await poll(health_status, lambda s: s == "ok", timeout=30, interval=0.2)
        assert (await http.get(server_url + "plexus/api/tasks")).status_code == 200
        async with mcp_client() as client:
            started = await client.call_tool("run_demo_task", {"items": 3, "item_delay_ms": 0})
            assert not started.is_error, started.content[0].text


async def test_a_task_running_while_the_database_is_down_ends_recorded_and_the_loop_keeps_answering(
    server_url, token, runtime, mcp_client, own_cluster
):
    """The task's worker ends while nothing can be written: its slot is held and its end kept in memory (get_task
    answers from there) until the database returns, then recorded: COMPLETED with all its items, none RUNNING.
    Meanwhile Jupyter's own /api/status answers at once, and a store read says "unavailable" within the pool
    timeout (plexus_config: 3 s)."""
    headers = {"Authorization": f"token {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 10, "item_delay_ms": 100})
        task_id = started.structured_content["task_id"]
        await poll(lambda: runtime.manager.get(task_id).status.value, lambda s: s == "RUNNING")
        own_cluster.stop()
        try:
            at = time.monotonic()
            assert (await http.get(server_url + "api/status")).status_code == 200
            assert time.monotonic() - at < PROMPT
            at = time.monotonic()
            missing = await client.call_tool("get_task", {"task_id": "not-in-memory"})
            assert missing.is_error and "the store is unavailable" in missing.content[0].text
            assert time.monotonic() - at < 3.0 + PROMPT

            async def in_memory() -> str:
                got = await client.call_tool("get_task", {"task_id": task_id})
                assert not got.is_error, got.content[0].text
                return str(got.structured_content["status"])

            assert await poll(in_memory, lambda s: s == "COMPLETED", timeout=20) == "COMPLETED"
        finally:
            own_cluster.start()
        await recorded_in_full(http, server_url, runtime.store, task_id, items=10)


async def recorded_in_full(http: httpx2.AsyncClient, server_url: str, store: Any, task_id: str, items: int) -> None:
    """Once the database answers again: health is ok with no task RUNNING in the store (the final writes kept in
    memory meanwhile have committed), and the demo task is stored COMPLETED with all its items processed."""
    await poll(
        lambda: http.get(server_url + "plexus/api/health"),
        lambda r: r.json()["status"] == "ok" and r.json()["tasks"]["RUNNING"] == 0,
        timeout=30,
    )
    stored = store.get_task(task_id)
    assert stored is not None and stored.status.value == "COMPLETED"
    stages = {stage.name: stage for stage in stored.stages}
    assert stages["Processing"].processed_items == items and stages["Finalizing"].status.value == "COMPLETED"
