"""Store calls off the event loop, on a real Jupyter server whose store is a real PostgreSQL: while another
connection holds `LOCK TABLE tasks` (every statement on the table waits), the loop keeps answering: Jupyter's
own /api/status at once, health as degraded, and the MCP and REST reads as "the store is unavailable" (503)
within db_pool_timeout_seconds; a running task is still served from memory, and once the lock goes its final
write commits: nothing is lost, nothing stays RUNNING.

A store call made on the loop would block it until the lock goes or statement_timeout (STATEMENT_TIMEOUT)
cancels it: every timed request below would then take that long, far beyond its bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx2
import pytest
import sqlalchemy as sa

from .conftest import poll
from .test_store_outage import own_cluster, recorded_in_full

__all__ = ["own_cluster"]  # this module's own PostgreSQL cluster (module scope), stopped by nothing else

T = TypeVar("T")
POOL_TIMEOUT = 1.0  # db_pool_timeout_seconds: a store call slower than this answers "the store is unavailable"
PROMPT = 3.0  # seconds within which the loop answers (generous: the machine is shared); a blocked loop takes
STATEMENT_TIMEOUT = 30.0  # this long (db_statement_timeout_seconds) before PostgreSQL gives up on the statement


@pytest.fixture
def plexus_config(own_cluster) -> dict[str, Any]:
    return {
        "db_url": own_cluster.create_database(),
        "cancel_grace_seconds": 1.0,
        "poll_interval": 0.2,
        "progress_write_interval": 0.2,
        "db_pool_timeout_seconds": POOL_TIMEOUT,
        "db_statement_timeout_seconds": STATEMENT_TIMEOUT,
    }


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    """The call's result and how many seconds it took."""
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


async def test_a_table_lock_held_elsewhere_never_stalls_the_loop_and_loses_nothing(
    server_url, token, runtime, mcp_client, plexus_config
):
    assert runtime.manager.offload  # PostgreSQL: the manager's own store calls run on its writer thread
    headers = {"Authorization": f"token {token}"}
    locker = sa.create_engine(plexus_config["db_url"], poolclass=sa.pool.NullPool)
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 10, "item_delay_ms": 100})
        task_id = started.structured_content["task_id"]
        await poll(lambda: runtime.manager.get(task_id).status.value, lambda s: s == "RUNNING")
        with locker.connect() as conn:
            lock = conn.begin()
            conn.exec_driver_sql("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            try:
                status, took = await timed(http.get(server_url + "api/status"))  # Jupyter's own: no store
                assert status.status_code == 200 and took < PROMPT, took
                # A dispatch waits for its insert on the manager's writer thread, not on the loop.
                second = asyncio.ensure_future(client.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0}))
                status, took = await timed(http.get(server_url + "api/status"))
                assert status.status_code == 200 and took < PROMPT and not second.done(), took

                health, took = await timed(http.get(server_url + "plexus/api/health"))
                assert took < POOL_TIMEOUT + PROMPT, took
                store = health.json()["store"]["status"]
                assert health.json()["status"] == "degraded"
                assert store == f"the store is unavailable: no answer within {POOL_TIMEOUT:g} s"

                listing, took = await timed(http.get(server_url + "plexus/api/tasks"))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert listing.status_code == 503 and listing.headers["Retry-After"] == "5", listing.text
                assert listing.json()["error"]["message"].startswith("the store is unavailable")

                listed, took = await timed(client.call_tool("list_tasks", {}))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert listed.is_error and "the store is unavailable" in listed.content[0].text

                gone, took = await timed(client.call_tool("get_task", {"task_id": "not-in-memory"}))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert gone.is_error and "the store is unavailable" in gone.content[0].text

                # The running task is served from memory: it goes on to its last stage (the writes wait).
                async def progress() -> dict[str, Any]:
                    got = await client.call_tool("get_task", {"task_id": task_id})
                    assert not got.is_error, got.content[0].text
                    return dict(got.structured_content["progress"])

                await poll(progress, lambda p: p["stage"] == "Finalizing" and p["processed"] == p["total"], timeout=20)
                status, took = await timed(http.get(server_url + "api/status"))
                assert status.status_code == 200 and took < PROMPT, took
            finally:
                lock.rollback()
        dispatched = await second  # once the lock goes, its insert commits and it runs
        assert not dispatched.is_error, dispatched.content[0].text

        # Its final write commits once the lock goes (get_task serves it from memory until then).
        await recorded_in_full(http, server_url, runtime.store, task_id, items=10)
        done = (await http.get(server_url + f"plexus/api/tasks/{task_id}?history=true")).json()
        assert done["status"] == "COMPLETED" and done["history_total"] > 0
        await recorded_in_full(http, server_url, runtime.store, dispatched.structured_content["task_id"], items=1)
        listed = await client.call_tool("list_tasks", {"status": ["COMPLETED"]})
        assert not listed.is_error and len(listed.structured_content["tasks"]) == 2
    locker.dispose()
