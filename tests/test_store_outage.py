"""A real Jupyter server on a real PostgreSQL that stops and comes back: health turns degraded and says why, REST
answers 503 with Retry-After and MCP a clear tool error (never a traceback or a stalled loop), and all recover
when the database returns. The cluster is this module's own (tests/postgres.py), so stopping it disturbs no
other test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from .conftest import poll
from .postgres import PostgresCluster, cluster_for_tests


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
